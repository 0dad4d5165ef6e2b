"""The benchmark's DuckDB SQL computes what the scorer computes, so the comparison is fair."""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl

from benchmarks.som_batch import _agree, features_sql
from gateway.som.score import score_orders
from tests.som.conftest import messy_history, movers


def test_duckdb_sql_scores_as_the_scorer_does_with_customers_that_change_cell() -> None:
    """A customer's class of trade and state are those of its earliest line, in the SQL too."""
    df = movers(messy_history(300, 500, 3))
    scored = score_orders(df)
    con = duckdb.connect()
    con.register("src", df.with_row_index("_row").to_arrow())
    duck = pl.from_arrow(con.sql(features_sql("src", columns=df.columns + ["_row"])).to_arrow_table())
    duck = duck.sort("_row")
    assert _agree(scored["score"].to_numpy(), duck["score"].fill_null(np.nan).to_numpy()) == 1.0
    assert duck["flag"].to_list() == scored["flag"].to_list()
