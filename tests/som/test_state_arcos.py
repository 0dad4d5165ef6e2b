"""The live state takes a table in the ARCOS shape as batch does."""

from __future__ import annotations

import polars as pl
import pytest

from gateway.som.incremental import SomState
from gateway.som.io import SomInputError
from gateway.som.peers import peer_reference

from .conftest import messy_history
from .test_io import _to_arcos


def test_update_many_scores_an_arcos_table_as_its_native_twin() -> None:
    # ARCOS reports controlled substances only: every line is controlled
    native = messy_history(customers=30, days=400, seed=11).sort("date", maintain_order=True)
    native = native.with_columns(pl.lit(True).alias("controlled"))
    arcos = _to_arcos(native)
    peers = peer_reference(native)
    got = SomState(peers=peers).update_many(arcos)  # was som_invalid_line: "no usable 'customer'"
    want = SomState(peers=peers).update_many(native)
    assert len(got) == native.height
    assert [(g.score, g.flag, g.reasons) for g in got] == [(w.score, w.flag, w.reasons) for w in want]
    assert sum(w.flag for w in want) > 0


def test_an_arcos_table_with_a_bad_date_adds_none_of_its_lines() -> None:
    native = messy_history(customers=5, days=100, seed=2).sort("date", maintain_order=True)
    arcos = _to_arcos(native).with_columns(
        pl.when(pl.int_range(pl.len()) == 7).then(pl.lit("13452024"))
        .otherwise(pl.col("TRANSACTION_DATE")).alias("TRANSACTION_DATE"))
    state = SomState()
    with pytest.raises(SomInputError) as err:
        state.update_many(arcos)
    assert "13452024" in err.value.message
    assert state.customers == {} and state.groups == {}
