"""Incremental scoring: a bounded state per customer and per (customer, family), updated in O(1).

`SomState.update` runs the very function the batch kernel runs per line (kernels.process_line),
so a line scored here gets the score batch scoring gives it over the same history, provided the
lines of a customer arrive in time order (same-day lines in the order batch would see them: input
order). The peer reference is fixed (from `peer_reference`) and travels with the state, as do
the thresholds; `load(path, config, peers)` refuses a state built with other ones (its scores
would equal no batch run under the caller's): load the history again instead.

State size: kernels.G_SIZE floats per (customer, family) and kernels.C_SIZE per customer (a ring
of 13 calendar months and one of the last 32 order days), whatever the length of the history.
"""

from __future__ import annotations

import datetime as dt
import re
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from gateway.som import kernels as K
from gateway.som.config import SomConfig
from gateway.som.errors import SomError
from gateway.som.io import (DATE_RANGE, FALSE_WORDS, MAX_DOSAGE_UNITS, TRUE_WORDS, atomic_output,
                            detect_shape, read_orders)
from gateway.som.output import writing
from gateway.som.peers import (
    ALL,
    dense_codes,
    log1p_table,
    peer_matrix,
    prepare,
    run_starts,
    run_threads,
)
from gateway.som.score import LineScore, config_vector, findings_of, reasons_text

_EPOCH = dt.date(1970, 1, 1)
_ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}([T ].*)?")


def _controlled(value: Any) -> bool:
    """A line's `controlled` as read_orders reads the column (io.flag_values): absent is True;
    "false" or "N" is False (bool("false") would be True); 1/0 and 1.0/0.0 are True/False."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return True if value is None else bool(value)
    if isinstance(value, (int, np.integer, float, np.floating)) and value in (0, 1):
        return bool(value)  # 1.0 / 0.0 too, as a spreadsheet or pandas writes a flag
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise SomStateError("som_invalid_line", f"controlled {value!r} is not true/false")
_FORMAT = 3  # 3: the states keep their trailing 12-month sums and what derives from them


class SomStateError(SomError):
    """A line the state cannot take (out of time order, bad values) or an unreadable state."""


class SomState:
    """Per-customer and per-(customer, family) state of the scorer."""

    def __init__(self, config: SomConfig = SomConfig(), peers: pl.DataFrame | None = None) -> None:
        self._config = config
        self._cfg = config_vector(config)
        self.peers = peers
        self._peer_rows: dict[tuple[str, str, str], int] = {}
        self._peer_vectors = np.zeros((1, len(K.PEER_FIELDS)))
        self._peer_labels: list[tuple[str, str]] = []
        self._index: dict[tuple[str, str, str], tuple[int, float]] = {}
        if peers is not None and peers.height:
            _, self._peer_vectors, self._peer_labels = peer_matrix(peers, [], [], 0)
            self._index_peers()
        self.customers: dict[str, np.ndarray] = {}
        self.cells: dict[str, tuple[str, str]] = {}  # customer -> (class of trade, state)
        self.groups: dict[tuple[str, str], np.ndarray] = {}
        self._feat = np.empty(K.NF)

    @property
    def config(self) -> SomConfig:
        """The thresholds the state scores with; fixed (the kernel holds them as a vector, and
        the peer rows chosen under min_peer_customers are cached): a state for other thresholds
        is built or loaded with them (`load(path, config)`)."""
        return self._config

    def _index_peers(self) -> None:
        rows = self.peers.select("customer_type", "state", "family", "customers").iter_rows()
        self._index = {(t, s, f): (i, n) for i, (t, s, f, n) in enumerate(rows)}

    def _peer_for(self, ctype: str, state: str, family: str) -> int:
        key = (ctype, state, family)
        hit = self._peer_rows.get(key)
        if hit is None:
            hit = -1
            if self.peers is not None:
                for k in ((ctype, state, family), (ctype, ALL, family), (ALL, ALL, family)):
                    found = self._index.get(k)
                    if found is not None and found[1] >= self.config.min_peer_customers:
                        hit = found[0]
                        break
            self._peer_rows[key] = hit
        return hit

    def update(self, order: dict[str, Any]) -> LineScore:
        """Add one line (a mapping with the native columns: customer, family, date, dosage_units;
        optionally customer_type, state, controlled) and return its score."""
        try:
            customer = order["customer"]
            family = order["family"]
            date = order["date"]
            units = float(order["dosage_units"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SomStateError("som_invalid_line", f"line without a usable {exc}") from None
        # float(True) is 1.0: a flag is no count of units (batch refuses a boolean units column)
        if isinstance(order["dosage_units"], (bool, np.bool_)):
            raise SomStateError("som_invalid_line", "dosage_units true/false, expected a number")
        if customer is None or family is None:  # as read_orders refuses a null: not "None"
            raise SomStateError("som_missing_value", "a line without a customer or a family")
        customer, family = str(customer), str(family)
        if isinstance(date, str):  # YYYY-MM-DD, as read_orders takes text dates (io.parse_dates)
            try:
                text = date.strip()
                if not _ISO_DAY.fullmatch(text):  # fromisoformat also takes 20240105, 2024-W01-5
                    raise ValueError(text)
                date = dt.date.fromisoformat(text[:10])
            except ValueError:
                raise SomStateError("som_invalid_line",
                                    f"date {date!r} is not a date written YYYY-MM-DD") from None
        if isinstance(date, dt.datetime):
            date = date.date()
        if not isinstance(date, dt.date):
            raise SomStateError("som_invalid_line", "date must be a date")
        if not DATE_RANGE[0] <= date <= DATE_RANGE[1]:
            raise SomStateError("som_invalid_line",
                                f"date {date} outside {DATE_RANGE[0]} .. {DATE_RANGE[1]}")
        if not 0 <= units <= MAX_DOSAGE_UNITS:  # as read_orders: NaN, inf and absurd lines too
            raise SomStateError(
                "som_invalid_line",
                f"dosage_units must be a number from 0 to {MAX_DOSAGE_UNITS:,.0f}",
            )
        day = (date - _EPOCH).days
        controlled = _controlled(order.get("controlled"))

        c = self.customers.get(customer)
        if c is None:
            c = np.empty(K.C_SIZE)
            K.new_customer_state(c)
            self.customers[customer] = c
            self.cells[customer] = (str(order.get("customer_type") or ""),
                                    str(order.get("state") or ""))
        elif c[K.C_NDAYS] > 0:
            last = c[K.C_DAYS + ((int(c[K.C_NDAYS]) - 1) % K.ND) * K.C_DSLOT]
            if day < last:
                raise SomStateError("som_out_of_order",
                                    f"line of {date} after lines of a later date for {customer}")
        g = self.groups.get((customer, family))
        if g is None:
            g = np.empty((1, K.G_SIZE))
            K.new_group_state(g[0])
            self.groups[(customer, family)] = g
        ctype, state = self.cells[customer]
        p = self._peer_for(ctype, state, family)
        feat = self._feat
        score, bits = K.process_line(g, 0, c, day, units, controlled, self._peer_vectors, p,
                                     self._cfg, feat, True)
        reasons = ""
        if bits:
            label = self._peer_labels[p] if p >= 0 else (ALL, ALL)
            reasons = reasons_text(bits, feat, family, label, self.config.monthly_cap)
        return LineScore(float(score), bool(bits), reasons, findings_of(bits),
                         dict(zip(K.FEATURES, feat.tolist())))

    def update_many(self, df: pl.DataFrame) -> list[LineScore]:
        """Update with the lines of a table, in its order (sort it by date first). All or nothing:
        a line the state cannot take leaves the state as it was before the table (the error names
        the line), so that the table, once fixed, can be given again without counting its first
        lines twice. A table in the ARCOS shape is read as batch reads it (`read_orders`): its
        columns mapped, its dates parsed, and refused whole, with batch's codes, when they are
        not usable."""
        if "BUYER_DEA_NO" in df.columns and detect_shape(df.columns) == "arcos":
            df = read_orders(df)
        # The state before the table of each customer and group it touches (None: a new one).
        before_c: dict[str, np.ndarray | None] = {}
        before_g: dict[tuple[str, str], np.ndarray | None] = {}
        out = []
        try:
            for i, row in enumerate(df.iter_rows(named=True)):
                customer, family = row.get("customer"), row.get("family")
                if customer is not None and family is not None:
                    customer, family = str(customer), str(family)
                    if customer not in before_c:
                        c = self.customers.get(customer)
                        before_c[customer] = None if c is None else c.copy()
                    if (customer, family) not in before_g:
                        g = self.groups.get((customer, family))
                        before_g[(customer, family)] = None if g is None else g.copy()
                try:
                    out.append(self.update(row))
                except SomStateError as exc:
                    raise SomStateError(exc.code, f"line {i + 1} of the table: {exc.message}; "
                                                  "no line of the table was added") from None
        except BaseException:
            for name, vec in before_c.items():
                if vec is None:
                    self.customers.pop(name, None)
                    self.cells.pop(name, None)
                else:
                    self.customers[name] = vec
            for key, vec in before_g.items():
                if vec is None:
                    self.groups.pop(key, None)
                else:
                    self.groups[key] = vec
            raise
        return out

    def extend(self, df: pl.DataFrame) -> None:
        """Add the lines of a table without scoring them (seeding the live state from a history):
        the state `update_many` would leave, a thousand times faster. Each customer's lines are
        taken in (date, table) order, as the batch scorer takes them; a new customer's class of
        trade and state are those of its earliest line (as `update` takes them). A customer the
        state knows must have no line dated before its last one, else nothing is added
        (som_out_of_order)."""
        df = read_orders(df)
        if not df.height:
            return
        p = prepare(df)
        s_c, s_f, s_day, s_u, s_ctl, s_lu = p.sorted
        starts = run_starts(s_c)  # where each customer's lines start (codes 0, 1, ... in order)
        customers = df["customer"].gather(p.perm[starts]).cast(pl.String).to_list()
        # Groups, coded in input order: (customer code, family code) as one key.
        pair = (p.ccode.astype(np.uint64) * np.uint64(max(len(p.families), 1))
                + p.fcode.astype(np.uint64))
        gcode, gfirst = dense_codes(pair)
        s_g = gcode[p.perm]

        cstates = np.empty((p.ncust, K.C_SIZE))
        cells: list[tuple[str, str]] = []
        for c, name in enumerate(customers):
            known = self.customers.get(name)
            if known is None:
                K.new_customer_state(cstates[c])
                cells.append(p.cells[p.cust_ts[c]])
                continue
            cstates[c] = known
            cells.append(self.cells[name])
            if known[K.C_NDAYS] > 0:
                last = known[K.C_DAYS + ((int(known[K.C_NDAYS]) - 1) % K.ND) * K.C_DSLOT]
                if s_day[starts[c]] < last:
                    raise SomStateError("som_out_of_order",
                                        f"lines of {name} dated before its last line in the state")
        gstates = np.empty((len(gfirst), K.G_SIZE))
        group_keys = [(customers[c], p.families[f])
                      for c, f in zip(p.ccode[gfirst].tolist(), p.fcode[gfirst].tolist())]
        for g, key in enumerate(group_keys):
            known = self.groups.get(key)
            if known is None:
                K.new_group_state(gstates[g])
            else:
                gstates[g] = known[0]

        cell_ids: dict[tuple[str, str], int] = {}
        cust_cell = np.array([cell_ids.setdefault(cell, len(cell_ids)) for cell in cells], np.int64)
        peer_row = np.array([[self._peer_for(ctype, state, family) for family in p.families]
                             for ctype, state in cell_ids], np.int64).reshape(len(cell_ids), -1)
        run_threads(K.advance_states, [
            (s_c, s_f, s_g, s_day, s_u, s_ctl, s_lu, lo, hi, cstates, gstates, cust_cell, peer_row,
             self._peer_vectors, self._cfg, np.empty(K.NF), log1p_table())
            for lo, hi in p.chunks])

        for c, name in enumerate(customers):
            self.customers[name] = cstates[c]
            self.cells.setdefault(name, cells[c])
        for g, key in enumerate(group_keys):
            self.groups[key] = gstates[g:g + 1]

    # --- persistence -----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        customers = list(self.customers)
        groups = list(self.groups)
        meta = {
            "format": _FORMAT,
            "customer_size": K.C_SIZE,
            "group_size": K.G_SIZE,
            "config": self.config.as_dict(),
            "customers": customers,
            "cells": [list(self.cells[c]) for c in customers],
            "groups": [list(k) for k in groups],
        }
        buf = io.BytesIO()
        peers_buf = io.BytesIO()
        if self.peers is not None:
            self.peers.write_ipc(peers_buf)
        np.savez(
            buf,
            meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
            customers=np.array([self.customers[c] for c in customers]).reshape(-1, K.C_SIZE),
            groups=np.array([self.groups[k] for k in groups]).reshape(-1, K.G_SIZE),
            peers=np.frombuffer(peers_buf.getvalue(), np.uint8),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, config: SomConfig | None = None,
                   peers: pl.DataFrame | None = None) -> "SomState":
        """The state `to_bytes` wrote. `config` / `peers`: what the caller scores with; a state
        saved under other thresholds (som_state_config_mismatch) or another peer reference
        (som_state_peers_mismatch) is refused, since its scores would equal no batch run under
        the caller's. Without them the state's own are used."""
        try:
            z = np.load(io.BytesIO(data), allow_pickle=False)
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("format") != _FORMAT:
                raise SomStateError("som_state_version", f"state format {meta.get('format')}")
            # The kernel reads and writes these rows unchecked: a row of another layout or a
            # missing row must stop here, not corrupt scores and memory later.
            if (meta.get("customer_size"), meta.get("group_size")) != (K.C_SIZE, K.G_SIZE):
                raise SomStateError("som_state_version", "state vectors of another layout")
            customers, groups = z["customers"], z["groups"]  # each read (and checked) once
            shapes = (customers.shape, groups.shape, len(meta["cells"]))
            if shapes != ((len(meta["customers"]), K.C_SIZE), (len(meta["groups"]), K.G_SIZE),
                          len(meta["customers"])):
                raise SomStateError("som_state_unreadable",
                                    "state arrays do not match the names they are saved with")
            if (customers.dtype, groups.dtype) != (np.float64, np.float64):
                # the kernel would run on them all the same, cast or recompiled: other numbers
                raise SomStateError("som_state_unreadable", "state arrays that are not float64")
            peers_raw = z["peers"].tobytes()
            saved_config = SomConfig.from_dict(meta["config"])
            saved_peers = pl.read_ipc(io.BytesIO(peers_raw)) if peers_raw else None
            _same_basis(saved_config, saved_peers, config, peers)
            state = cls(saved_config, saved_peers)
            for name, cell, vec in zip(meta["customers"], meta["cells"], customers):
                state.customers[name] = vec.copy()
                state.cells[name] = (cell[0], cell[1])
            for key, vec in zip(meta["groups"], groups):
                state.groups[(key[0], key[1])] = vec.reshape(1, -1).copy()
        except SomStateError:
            raise
        except Exception as exc:  # a corrupt or foreign file
            raise SomStateError("som_state_unreadable", f"not a SOM state: {exc}") from None
        return state

    def save(self, path: str | Path) -> None:
        """Write the state to `path`, all or nothing; OutputError som_output_unwritable (with the
        OS message) when it cannot be written, the previous file left as it was."""
        path = Path(path)
        with writing(path, "cannot write the state: "), atomic_output(path) as tmp:
            tmp.write_bytes(self.to_bytes())  # a temporary file of this run's own, then renamed

    @classmethod
    def load(cls, path: str | Path, config: SomConfig | None = None,
             peers: pl.DataFrame | None = None) -> "SomState":
        """A saved state; SomStateError som_state_not_found when there is none at `path`,
        som_state_unreadable when it cannot be read (truncated, corrupted, not a state),
        som_state_version when it is of another format, som_state_config_mismatch /
        som_state_peers_mismatch when `config` / `peers` are given and it was built with others
        (load the history again under them: `gateway som load-history`)."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise SomStateError("som_state_not_found", f"{path}: no SOM state here") from None
        except OSError as exc:
            raise SomStateError("som_state_unreadable", f"{path}: {exc.strerror or exc}") from None
        return cls.from_bytes(data, config, peers)


def _same_basis(saved_config: SomConfig, saved_peers: pl.DataFrame | None,
                config: SomConfig | None, peers: pl.DataFrame | None) -> None:
    """Refuse a saved state built on other thresholds or another peer reference than the
    caller's (None: the caller takes the state's)."""
    if config is not None and config != saved_config:
        mine, theirs = config.as_dict(), saved_config.as_dict()
        changed = ", ".join(f"{k} {theirs[k]} (now {mine[k]})" for k in mine if mine[k] != theirs[k])
        raise SomStateError("som_state_config_mismatch",
                            f"the state was built with other thresholds: {changed}; "
                            "load the history again under the current ones")
    if peers is not None and (saved_peers is None or not saved_peers.equals(peers)):
        raise SomStateError("som_state_peers_mismatch",
                            "the state was built with another peer reference; "
                            "load the history again with the current one")
