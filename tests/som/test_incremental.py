"""Incremental scoring gives the batch score for the same history; its state is bounded and
survives save and load."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from gateway.som import kernels as K, reference
from gateway.som.config import SomConfig
from gateway.som.incremental import SomState, SomStateError
from gateway.som.peers import peer_reference
from gateway.som.score import score_orders

from .conftest import assert_same_state, lines, messy_history, monthly, movers


def _time_order(df: pl.DataFrame) -> pl.DataFrame:
    # Time order; same-day lines in input order (what batch scoring assumes too).
    return df.sort("date", maintain_order=True)


@pytest.fixture(scope="module")
def history() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    df = _time_order(messy_history(customers=80, days=500, seed=3))
    peers = peer_reference(df)
    return df, peers, score_orders(df, peers=peers)


def test_incremental_equals_batch(history) -> None:
    df, peers, batch = history
    state = SomState(peers=peers)
    got = state.update_many(df)
    assert np.allclose([g.score for g in got], batch["score"].to_numpy(), rtol=1e-12, atol=0)
    assert [g.flag for g in got] == batch["flag"].to_list()
    assert [g.reasons for g in got] == batch["reasons"].to_list()
    assert batch["flag"].sum() > 5


def test_save_load_midway_then_continue(history, tmp_path) -> None:
    df, peers, batch = history
    half = df.height // 2
    state = SomState(peers=peers)
    state.update_many(df[:half])
    state.save(tmp_path / "som.state")
    restored = SomState.load(tmp_path / "som.state")
    rest = restored.update_many(df[half:])
    assert np.allclose([g.score for g in rest], batch["score"].to_numpy()[half:], rtol=1e-12, atol=0)
    assert [g.reasons for g in rest] == batch["reasons"].to_list()[half:]
    again = SomState.from_bytes(restored.to_bytes())
    assert again.config == restored.config and set(again.groups) == set(restored.groups)


def test_state_is_bounded() -> None:
    state = SomState()
    start = dt.date(2020, 1, 1)
    for k in range(2000):  # five years of daily orders
        state.update({"customer": "AB1234563", "family": "oxycodone",
                      "date": start + dt.timedelta(days=k), "dosage_units": 100.0})
    (g,) = state.groups.values()
    (c,) = state.customers.values()
    assert g.shape == (1, K.G_SIZE) and c.shape == (K.C_SIZE,)
    assert len(state.to_bytes()) < 20_000


def test_a_line_gets_its_batch_reasons() -> None:
    rows = monthly("AB1234563", "oxycodone", 1000, "2024-01", 12)
    state = SomState()
    for r in rows:
        assert not state.update({"customer": r[0], "family": r[1], "date": r[2],
                                 "dosage_units": r[3]}).flag
    got = state.update({"customer": "AB1234563", "family": "oxycodone", "date": "2025-01-15",
                        "dosage_units": 4000})
    batch = score_orders(lines(rows + [("AB1234563", "oxycodone", "2025-01-15", 4000)]))
    assert got.flag and got.reasons == batch["reasons"][-1]
    assert got.score == pytest.approx(batch["score"][-1])
    assert "size" in got.findings and got.features["size_ratio"] == 4.0


def test_bad_lines_and_bad_states() -> None:
    state = SomState()
    state.update({"customer": "AB1234563", "family": "oxycodone", "date": "2024-03-01",
                  "dosage_units": 10})
    with pytest.raises(SomStateError) as e:
        state.update({"customer": "AB1234563", "family": "oxycodone", "date": "2024-02-01",
                      "dosage_units": 10})
    assert e.value.code == "som_out_of_order"
    with pytest.raises(SomStateError) as e:
        state.update({"customer": "AB1234563", "family": "oxycodone", "date": "2024-03-02",
                      "dosage_units": -5})
    assert e.value.code == "som_invalid_line"
    for units in (float("nan"), float("inf"), 1e13):  # as read_orders refuses them
        with pytest.raises(SomStateError) as e:
            state.update({"customer": "AB1234563", "family": "oxycodone", "date": "2024-03-02",
                          "dosage_units": units})
        assert e.value.code == "som_invalid_line"
    with pytest.raises(SomStateError) as e:
        state.update({"customer": "AB1234563", "date": "2024-03-02", "dosage_units": 5})
    assert e.value.code == "som_invalid_line"
    with pytest.raises(SomStateError) as e:
        SomState.from_bytes(b"not a state")
    assert e.value.code == "som_state_unreadable"


def test_config_travels_with_the_state() -> None:
    state = SomState(SomConfig(monthly_cap=5000))
    assert SomState.from_bytes(state.to_bytes()).config.monthly_cap == 5000


def test_extend_leaves_the_state_update_many_leaves(history) -> None:
    """The bulk load (load-history) and line-by-line updates end in identical states, also when
    the table is not in time order (extend sorts each customer's lines) and when the state
    already holds the first part of the history."""
    df, peers, batch = history
    by_update = SomState(peers=peers)
    by_update.update_many(df)
    bulk = SomState(peers=peers)
    bulk.extend(df.sort("customer", "date", maintain_order=True))  # customer by customer
    assert_same_state(by_update, bulk)

    cut = df["date"][df.height // 2]
    split = SomState(peers=peers)
    split.update_many(df.filter(pl.col("date") < cut))
    split.extend(df.filter(pl.col("date") >= cut))
    assert_same_state(by_update, split)
    # and it goes on scoring as the batch does
    last = df.row(df.height - 1, named=True)
    nxt = {**last, "date": last["date"] + dt.timedelta(days=3), "dosage_units": 50_000.0}
    a, b = split.update(nxt), by_update.update(nxt)
    assert (a.score, a.flag, a.reasons) == (b.score, b.flag, b.reasons) and a.flag


def test_customers_that_change_cell_score_alike_in_batch_bulk_and_line_by_line() -> None:
    """A customer whose class of trade or state changes takes the cell of its earliest line in
    every path: batch scoring and the peer reference of the file in any row order, the bulk load
    (extend) and line-by-line updates."""
    rows = movers(messy_history(customers=80, days=500, seed=3)).with_row_index("_row")
    timed = _time_order(rows)
    peers = peer_reference(rows)
    assert peers.equals(peer_reference(timed))
    batch = score_orders(rows, peers=peers).sort("_row")
    by_update = SomState(peers=peers)
    got = dict(zip(timed["_row"].to_list(), by_update.update_many(timed)))
    live = [got[i] for i in range(rows.height)]
    assert np.allclose([g.score for g in live], batch["score"].to_numpy(), rtol=1e-12, atol=0)
    assert [g.flag for g in live] == batch["flag"].to_list()
    assert [g.reasons for g in live] == batch["reasons"].to_list()
    assert batch["flag"].sum() > 5
    bulk = SomState(peers=peers)
    bulk.extend(rows)  # the file's own order
    assert_same_state(by_update, bulk)
    first = timed.group_by("customer", maintain_order=True).first()
    assert bulk.cells == {c: (t, s) for c, t, s in first.select(
        "customer", "customer_type", "state").iter_rows()}


def test_extend_refuses_lines_before_a_known_customers_last_and_adds_nothing(history) -> None:
    df, peers, _ = history
    cut = df["date"][df.height // 2]
    state = SomState(peers=peers)
    state.update_many(df.filter(pl.col("date") >= cut))
    before = state.to_bytes()
    with pytest.raises(SomStateError) as e:
        state.extend(df.filter(pl.col("date") < cut))
    assert e.value.code == "som_out_of_order"
    assert state.to_bytes() == before


def _rewritten(data: bytes, **change) -> bytes:
    """A saved state with some of its meta or arrays replaced (as an older or damaged file)."""
    import io
    import json

    z = np.load(io.BytesIO(data), allow_pickle=False)
    parts = {k: z[k] for k in z.files}
    meta = json.loads(parts["meta"].tobytes().decode())
    meta.update(change.pop("meta", {}))
    parts.update(change)
    parts["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **parts)
    return buf.getvalue()


def test_a_state_of_another_format_or_layout_is_refused_not_misread(history) -> None:
    """The kernel reads state rows without bounds checks: rows of an older layout, or arrays
    that do not match their names, must be refused at load."""
    df, peers, _ = history
    state = SomState(peers=peers)
    state.update_many(df[:2000])
    data = state.to_bytes()
    meta_ok = SomState.from_bytes(data)
    assert set(meta_ok.groups) == set(state.groups)

    with pytest.raises(SomStateError) as e:  # an older format number
        SomState.from_bytes(_rewritten(data, meta={"format": 2}))
    assert e.value.code == "som_state_version"
    with pytest.raises(SomStateError) as e:  # the same number, rows of another width
        z = np.load(__import__("io").BytesIO(data))
        SomState.from_bytes(_rewritten(data, groups=z["groups"][:, :-11],
                                       meta={"group_size": K.G_SIZE - 11}))
    assert e.value.code == "som_state_version"
    with pytest.raises(SomStateError) as e:  # narrower rows than the meta says
        SomState.from_bytes(_rewritten(data, customers=z["customers"][:, :-3]))
    assert e.value.code == "som_state_unreadable"
    with pytest.raises(SomStateError) as e:  # fewer group rows than named groups
        SomState.from_bytes(_rewritten(data, groups=z["groups"][:-1]))
    assert e.value.code == "som_state_unreadable"


def test_order_days_of_zero_units_give_no_usual_day_and_no_infinite_score() -> None:
    """A family whose trailing order days all had 0 units has no usual order day: the
    sustained-rise check is not judged (it divided by 0 and scored inf)."""
    start = dt.date(2023, 1, 2)
    rows = [{"customer": "AB1234563", "customer_type": "retail", "state": "OH",
             "family": "oxycodone", "date": start + dt.timedelta(days=7 * k),
             "dosage_units": 0.0} for k in range(60)]
    rows += [{**rows[-1], "date": rows[-1]["date"] + dt.timedelta(days=d), "dosage_units": 100.0}
             for d in (1, 2, 3, 4)]
    df = pl.DataFrame(rows)
    out = score_orders(df, keep_features=True)
    assert np.isfinite(out["score"].to_numpy()).all()
    assert out["sustained_ratio"].is_nan().all() and out["usual_day_units"].is_nan().all()
    ref = reference.features(df)  # the plain Polars implementation agrees
    assert ref["sustained_ratio"].is_nan().all() and ref["usual_day_units"].is_nan().all()
    state = SomState(peers=peer_reference(df))
    got = state.update_many(df)
    assert [g.score for g in got] == out["score"].to_list()


def test_a_live_line_is_read_as_the_batch_reads_its_columns() -> None:
    """Text dates are YYYY-MM-DD or refused with a code (they raised a bare ValueError);
    "false" in `controlled` is false (bool("false") is True), as io.flag_values reads it."""
    state = SomState()
    base = {"customer": "AB1234563", "family": "oxycodone", "dosage_units": 10}
    for bad in ("03/02/2024", "yesterday", "0001-01-01", "2100-01-01"):
        with pytest.raises(SomStateError) as e:
            state.update({**base, "date": bad})
        assert e.value.code == "som_invalid_line"
    with pytest.raises(SomStateError) as e:
        state.update({**base, "date": "2024-03-02", "controlled": "maybe"})
    assert e.value.code == "som_invalid_line"
    state.update({**base, "date": "2024-03-02", "controlled": "false"})
    state.update({**base, "date": "2024-03-03T10:00:00", "controlled": "N"})
    c = state.customers["AB1234563"]
    # two order days (slots of: day, units, controlled units), neither counted as controlled
    assert [c[K.C_DAYS + k * K.C_DSLOT + 1] for k in (0, 1)] == [10.0, 10.0]
    assert [c[K.C_DAYS + k * K.C_DSLOT + 2] for k in (0, 1)] == [0.0, 0.0]


def test_a_live_line_without_customer_or_family_is_refused_as_the_batch_refuses_it() -> None:
    """None is a missing value (read_orders: som_missing_value), not a customer named "None"."""
    from gateway.som.io import SomInputError, read_orders

    state = SomState()
    base = {"customer": "AB1234563", "family": "oxycodone", "date": "2024-03-02",
            "dosage_units": 10}
    for key in ("customer", "family"):
        with pytest.raises(SomStateError) as e:
            state.update({**base, key: None})
        assert e.value.code == "som_missing_value"
        with pytest.raises(SomInputError) as b:
            read_orders(pl.DataFrame([{**base, key: None}], schema_overrides={key: pl.String}))
        assert b.value.code == e.value.code
    assert state.customers == {} and state.groups == {}


def test_a_live_controlled_flag_of_1_0_or_0_0_is_read_as_the_batch_reads_it() -> None:
    """A flag written 1.0/0.0 (a spreadsheet, pandas) is true/false in batch (io.flag_values):
    the live path takes it alike, and scores the line as the batch does."""
    rows = [(f"2024-{m:02d}-05", 1.0) for m in range(1, 13)] + [("2025-01-06", 0.0),
                                                                ("2025-01-07", np.float64(1.0))]
    table = pl.DataFrame({"customer": "AB1234563", "family": "oxycodone",
                          "date": [dt.date.fromisoformat(d) for d, _ in rows],
                          "dosage_units": 100.0, "controlled": [float(c) for _, c in rows]})
    batch = score_orders(table)
    state = SomState(peers=peer_reference(table))
    got = [state.update({"customer": "AB1234563", "family": "oxycodone", "date": d,
                         "dosage_units": 100.0, "controlled": c}) for d, c in rows]
    assert [g.score for g in got] == batch["score"].to_list()
    c = state.customers["AB1234563"]
    controlled = {c[K.C_DAYS + k * K.C_DSLOT]: c[K.C_DAYS + k * K.C_DSLOT + 2]
                  for k in range(int(c[K.C_NDAYS]))}
    day = (dt.date(2025, 1, 6) - dt.date(1970, 1, 1)).days
    assert (controlled[day], controlled[day + 1]) == (0.0, 100.0)
    for bad in (0.5, 2.0, float("nan")):
        with pytest.raises(SomStateError) as e:
            state.update({"customer": "AB1234563", "family": "oxycodone", "date": "2025-01-08",
                          "dosage_units": 1.0, "controlled": bad})
        assert e.value.code == "som_invalid_line"


def test_live_dates_are_the_batch_s_dates_and_the_state_file_is_written_whole(tmp_path) -> None:
    """fromisoformat also takes 20240105 and 2024-W01-5, which read_orders refuses; and a state
    saved over an old one goes through a temporary file of its own, removed on failure."""
    state = SomState()
    base = {"customer": "AB1234563", "family": "oxycodone", "dosage_units": 10}
    for bad in ("20240105", "2024-W01-5", "2024-1-5"):
        with pytest.raises(SomStateError) as e:
            state.update({**base, "date": bad})
        assert e.value.code == "som_invalid_line"
    state.update({**base, "date": "2024-01-05"})
    target = tmp_path / "som.state"
    target.write_bytes(b"old")
    state.save(target)
    assert SomState.load(target).customers.keys() == state.customers.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["som.state"]
