"""Scoring by partitions of customers gives the single-process scores bit for bit: in-process,
on two local worker processes, and on a Dask LocalCluster of two workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gateway.som.io import SomInputError
from gateway.som.partition import PartitionError, merge_references, score_file
from gateway.som.peers import peer_reference
from gateway.som.score import score_orders
from gateway.som.synth import synthesize

KEY = ["order_id", "line"]


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> tuple[Path, pl.DataFrame]:
    frame = synthesize(customers=150, days=450, seed=21)
    path = tmp_path_factory.mktemp("som_part") / "history.parquet"
    frame.write_parquet(path)
    return path, frame


@pytest.fixture(scope="module")
def single(history) -> pl.DataFrame:
    return score_orders(history[1])


def _same_scores(single: pl.DataFrame, out: pl.DataFrame) -> None:
    assert out.columns == single.columns  # input columns kept, in order, then the scorer's
    assert out.height == single.height
    j = single.join(out, on=KEY, suffix="_p", how="inner")
    assert j.height == single.height
    # Bit for bit: a line whose score sits exactly at a limit is flagged alike on any number of
    # partitions (the peer sums are exact, so merging them changes nothing).
    assert np.array_equal(j["score_p"].to_numpy(), j["score"].to_numpy())
    assert (j["flag_p"] == j["flag"]).all()
    assert (j["reasons_p"].fill_null("") == j["reasons"].fill_null("")).all()
    assert (j["dosage_units_p"] == j["dosage_units"]).all() and (j["label_p"] == j["label"]).all()
    assert int(single["flag"].sum()) > 50  # the comparison covers flagged lines


def test_merged_partition_references_equal_the_whole(history) -> None:
    frame = history[1]
    whole = peer_reference(frame)
    for count in (2, 3, 5):
        parts = [frame.filter(pl.col("customer").hash(seed=0) % count == i) for i in range(count)]
        merged = merge_references([peer_reference(p) for p in parts])
        assert merged.select("level", "customer_type", "state", "family").equals(
            whole.select("level", "customer_type", "state", "family"))
        for col in whole.columns:
            assert merged[col].equals(whole[col]), col  # every bit, not about the same
        # and in whichever order the partitions' references come
        assert merge_references([peer_reference(p) for p in parts[::-1]]).equals(whole)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_partitions_give_the_single_process_bits(history, single, tmp_path, count) -> None:
    run = score_file(history[0], tmp_path / "scored.parquet", partitions=count)
    assert run.partitions == count
    _same_scores(single, pl.read_parquet(run.output))


def test_in_process_partitions(history, single, tmp_path) -> None:
    seen: list[str] = []
    run = score_file(history[0], tmp_path / "scored.parquet", partitions=4, progress=seen.append)
    assert (run.partitions, run.workers, run.engine, run.lines) == (4, 1, "local", single.height)
    assert run.flagged == int(single["flag"].sum())
    assert seen == ["split"] + ["peers"] * 4 + ["reference"] + ["score"] * 4 + ["write"]
    _same_scores(single, pl.read_parquet(run.output))
    assert not list(tmp_path.glob(".*parts*"))  # the parts are cleaned up


def test_whole_file_path(history, single, tmp_path) -> None:
    run = score_file(history[0], tmp_path / "scored.parquet", partitions=1)
    _same_scores(single, pl.read_parquet(run.output))


def test_two_local_processes_csv_in_and_out(history, single, tmp_path) -> None:
    csv = tmp_path / "history.csv"
    history[1].write_csv(csv)
    run = score_file(csv, tmp_path / "scored.csv", partitions=3, workers=2)
    assert run.workers == 2
    out = pl.read_csv(run.output, try_parse_dates=True, schema_overrides={"order_id": pl.String})
    _same_scores(single, out.with_columns(pl.col("dosage_units").cast(single.schema["dosage_units"])))


def test_dask_cluster_of_two_workers(history, single, tmp_path) -> None:
    """An existing Dask cluster (here a LocalCluster of two worker processes), by its address."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        run = score_file(history[0], tmp_path / "scored.parquet", partitions=4, engine="dask",
                         scheduler=cluster.scheduler_address)
        assert len(cluster.workers) == 2
    assert run.engine == "dask"
    _same_scores(single, pl.read_parquet(run.output))


def test_bad_options(history, tmp_path) -> None:
    with pytest.raises(PartitionError) as err:
        score_file(history[0], tmp_path / "o.parquet", engine="spark")
    assert err.value.code == "som_unknown_engine"
    with pytest.raises(PartitionError) as err:
        score_file(history[0], tmp_path / "o.json")
    assert err.value.code == "som_unknown_output"
    with pytest.raises(SomInputError) as err:
        score_file(tmp_path / "absent.parquet", tmp_path / "o.parquet")
    assert err.value.code == "som_file_not_found"
    foreign = tmp_path / "foreign.parquet"
    pl.DataFrame({"a": [1], "b": [2]}).write_parquet(foreign)
    with pytest.raises(SomInputError):
        score_file(foreign, tmp_path / "o.parquet", partitions=2)
    assert not (tmp_path / "o.parquet").exists()


def test_arcos_shape_by_partitions(history, tmp_path) -> None:
    """The public ARCOS shape (BUYER_DEA_NO, DRUG_NAME, TRANSACTION_DATE as MMDDYYYY...) partitions
    on the buyer and scores as it does whole."""
    arcos = history[1].select(
        TRANSACTION_ID=pl.col("order_id") + "-" + pl.col("line").cast(pl.String),
        BUYER_DEA_NO="customer", BUYER_BUS_ACT="customer_type", BUYER_STATE="state", DRUG_NAME="family",
        NDC_NO="ndc", DOSAGE_UNIT="dosage_units", TRANSACTION_DATE=pl.col("date").dt.strftime("%m%d%Y"))
    path = tmp_path / "arcos.csv"
    arcos.write_csv(path)
    whole = score_file(path, tmp_path / "whole.parquet", partitions=1)
    parts = score_file(path, tmp_path / "parts.parquet", partitions=3)
    a = pl.read_parquet(whole.output)
    b = pl.read_parquet(parts.output)
    # the input's own columns, as written (a CSV's text: MMDDYYYY dates), then the scores
    assert a.columns == b.columns == [*arcos.columns, "score", "flag", "reasons"]
    assert a.select(arcos.columns).equals(pl.read_csv(path, infer_schema=False))
    j = a.join(b, on="TRANSACTION_ID", suffix="_p")
    assert j.height == arcos.height
    np.testing.assert_allclose(j["score_p"].to_numpy(), j["score"].to_numpy(), rtol=1e-9, atol=1e-9)
    assert (j["flag"] == j["flag_p"]).all() and int(j["flag"].sum()) > 0


def test_more_partitions_than_customers(tmp_path) -> None:
    small = synthesize(customers=12, days=200, seed=8)
    path = tmp_path / "small.parquet"
    small.write_parquet(path)
    seen: list[str] = []
    run = score_file(path, tmp_path / "scored.parquet", partitions=40, progress=seen.append)
    assert len(seen) == 2 * 40 + 3  # a progress bar reaches its end even with empty partitions
    out = pl.read_parquet(run.output)
    single = score_orders(small)
    j = single.join(out, on=KEY, suffix="_p")
    assert j.height == small.height == out.height
    np.testing.assert_allclose(j["score_p"].to_numpy(), j["score"].to_numpy(), rtol=1e-9, atol=1e-9)


def test_default_partitions_follow_the_line_count(history, tmp_path, monkeypatch) -> None:
    from gateway.som import partition

    assert partition.default_partitions(history[0]) == 1
    assert partition.default_partitions(history[0], workers=3) == 3
    monkeypatch.setattr(partition, "TARGET_PARTITION_LINES", 10_000)
    lines = history[1].height
    assert partition.default_partitions(history[0]) == -(-lines // 10_000)
    csv = tmp_path / "h.csv"
    history[1].write_csv(csv)
    assert partition.default_partitions(csv) == -(-(csv.stat().st_size // partition.CSV_BYTES_PER_LINE) // 10_000)


def test_coded_errors_come_back_from_worker_processes(history, tmp_path) -> None:
    bad = history[1].with_columns(
        dosage_units=pl.when(pl.int_range(pl.len()) == 5).then(-3).otherwise(pl.col("dosage_units")))
    path = tmp_path / "bad.parquet"
    bad.write_parquet(path)
    with pytest.raises(PartitionError) as err:
        score_file(path, tmp_path / "out.parquet", partitions=2, workers=2)
    assert err.value.code == "som_invalid_units"
    assert not (tmp_path / "out.parquet").exists()
    assert not list(tmp_path.glob(".*parts*"))


def test_whole_number_units_come_back_as_they_went_in(tmp_path) -> None:
    """The output keeps the input columns with their types: integer dosage units stay integers,
    on the in-memory path and the partitioned one, in Parquet and in CSV."""
    from gateway.som.synth import synthesize

    frame = synthesize(customers=40, days=200, seed=5).with_columns(pl.col("dosage_units").cast(pl.Int64))
    src = tmp_path / "in.parquet"
    frame.write_parquet(src)
    for partitions in (1, 3):
        for suffix in (".parquet", ".csv"):
            out = tmp_path / f"out-{partitions}{suffix}"
            score_file(src, out, partitions=partitions)
            back = pl.read_parquet(out) if suffix == ".parquet" else pl.read_csv(out)
            assert back.schema["dosage_units"] == pl.Int64, (partitions, suffix)
            assert sorted(back["dosage_units"].to_list()) == sorted(frame["dosage_units"].to_list())
