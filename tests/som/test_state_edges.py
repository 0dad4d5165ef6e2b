"""The live state on bad tables, lines and files: a table with a bad line adds nothing (no line
counted twice when it is given again), a line whose units are true/false is refused as batch
refuses it, a state file that is missing, unwritable or of foreign numbers is a coded error."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest

from gateway.som.incremental import SomState, SomStateError
from gateway.som.output import OutputError
from gateway.som.peers import peer_reference

from .conftest import assert_same_state, messy_history


@pytest.fixture(scope="module")
def history() -> tuple[pl.DataFrame, pl.DataFrame]:
    df = messy_history(customers=30, days=300, seed=11).sort("date", maintain_order=True)
    return df, peer_reference(df)


def test_a_table_with_a_bad_line_adds_nothing_and_can_be_given_again(history) -> None:
    """update_many applied the lines before the bad one and raised: the fixed table given again
    counted them twice (same-day lines are in order), with scores unlike batch scoring's."""
    df, peers = history
    cut = df.height // 2
    state = SomState(peers=peers)
    state.update_many(df[:cut])
    before = state.to_bytes()
    batch = df[cut:cut + 400].with_columns(pl.col("date").cast(pl.String))
    bad = batch.with_columns(pl.when(pl.int_range(pl.len()) == 300).then(pl.lit("05/03/2024"))
                             .otherwise(pl.col("date")).alias("date"))
    with pytest.raises(SomStateError) as e:
        state.update_many(bad)
    assert e.value.code == "som_invalid_line" and "line 301" in str(e.value)
    assert state.to_bytes() == before  # new customers and groups of the table gone too
    got = state.update_many(batch)
    clean = SomState(peers=peers)
    clean.update_many(df[:cut])
    assert [g.score for g in got] == [g.score for g in clean.update_many(batch)]
    assert_same_state(state, clean)


def test_a_table_out_of_order_adds_nothing(history) -> None:
    df, peers = history
    state = SomState(peers=peers)
    state.update_many(df[:500])
    before = state.to_bytes()
    customer = df["customer"][0]
    late = df[500:700].vstack(df.filter(pl.col("customer") == customer)[:1])  # an old line last
    with pytest.raises(SomStateError) as e:
        state.update_many(late)
    assert e.value.code == "som_out_of_order"
    assert state.to_bytes() == before


def test_a_missing_or_unreadable_state_file_is_a_coded_error(tmp_path) -> None:
    with pytest.raises(SomStateError) as e:  # a FileNotFoundError traceback
        SomState.load(tmp_path / "state.bin")
    assert e.value.code == "som_state_not_found"
    with pytest.raises(SomStateError) as e:  # IsADirectoryError
        SomState.load(tmp_path)
    assert e.value.code == "som_state_unreadable"


def test_a_state_that_cannot_be_written_is_a_coded_error(tmp_path) -> None:
    state = SomState()
    state.update({"customer": "AB1234563", "family": "oxycodone", "date": "2024-01-05",
                  "dosage_units": 10})
    with pytest.raises(OutputError) as e:  # a FileNotFoundError traceback
        state.save(tmp_path / "absent" / "state.bin")
    assert e.value.code == "som_output_unwritable" and "cannot write the state" in str(e.value)
    (tmp_path / "taken").mkdir()  # the name taken by a directory
    with pytest.raises(OutputError) as e:
        state.save(tmp_path / "taken")
    assert e.value.code == "som_output_unwritable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert list((tmp_path / "taken").iterdir()) == []


def _with_arrays(data: bytes, **arrays: np.ndarray) -> bytes:
    z = np.load(io.BytesIO(data), allow_pickle=False)
    parts = {k: z[k] for k in z.files}
    parts.update(arrays)
    buf = io.BytesIO()
    np.savez(buf, **parts)
    return buf.getvalue()


@pytest.mark.parametrize("dtype", ["float32", "int64", "bool", "complex128"])
def test_a_state_of_other_numbers_is_refused(dtype) -> None:
    """Rows of the right shape in another type loaded, and the kernel ran on them: a bool state
    scored 0.000125 where the float64 one scores 0, a complex one raised NotImplementedError."""
    state = SomState()
    for day in range(1, 28):
        state.update({"customer": "AB1234563", "family": "oxycodone",
                      "date": f"2024-01-{day:02d}", "dosage_units": 100})
    data = state.to_bytes()
    z = np.load(io.BytesIO(data), allow_pickle=False)
    assert json.loads(z["meta"].tobytes())["customers"] == ["AB1234563"]
    with np.errstate(invalid="ignore"):  # NaN cells cast to whole numbers
        other = _with_arrays(data, customers=z["customers"].astype(dtype),
                             groups=z["groups"].astype(dtype))
    with pytest.raises(SomStateError) as e:
        SomState.from_bytes(other)
    assert e.value.code == "som_state_unreadable"
    SomState.from_bytes(data)  # the file as written loads


def test_a_live_line_with_true_false_units_is_refused_as_batch_refuses_them() -> None:
    """float(True) is 1.0: a line whose units were a flag was scored as one unit, where batch
    scoring refuses a boolean units column (som_invalid_units)."""
    from gateway.som.io import SomInputError, read_orders

    base = {"customer": "AB1234563", "family": "oxycodone", "date": "2024-03-02"}
    with pytest.raises(SomInputError) as b:
        read_orders(pl.DataFrame([{**base, "dosage_units": True}]))
    assert b.value.code == "som_invalid_units"
    state = SomState()
    for flag in (True, False, np.bool_(True)):
        with pytest.raises(SomStateError) as e:
            state.update({**base, "dosage_units": flag})
        assert e.value.code == "som_invalid_line"
    assert state.customers == {} and state.groups == {}
