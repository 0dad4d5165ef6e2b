"""The synthetic history: shape, determinism, and anomalies that look like what they claim to be."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from gateway.som.synth import ANOMALY_KINDS, CLASSES, MONTHLY_CAP, synthesize, write_synthetic

NATIVE = ["order_id", "line", "customer", "customer_type", "state", "family", "ndc", "date", "dosage_units",
          "controlled"]


@pytest.fixture(scope="module")
def frame() -> pl.DataFrame:
    return synthesize(customers=300, days=730, seed=11)


def _monthly(frame: pl.DataFrame) -> pl.DataFrame:
    return (frame.group_by("customer", "family", month=pl.col("date").dt.truncate("1mo"))
            .agg(units=pl.col("dosage_units").sum(), labelled=pl.col("label").any(),
                 kinds=pl.col("anomaly").unique()))


def test_columns_and_types(frame: pl.DataFrame) -> None:
    assert frame.columns == NATIVE + ["label", "anomaly", "anomaly_detail"]
    assert frame.schema["line"] == pl.Int32
    assert frame.schema["date"] == pl.Date
    assert frame.schema["dosage_units"] == pl.Int64
    assert frame.schema["label"] == pl.Boolean
    assert frame.height > 100_000
    assert frame.null_count().sum_horizontal().item() == 0
    assert frame["date"].min() >= dt.date(2024, 1, 1)
    assert frame["date"].max() < dt.date(2024, 1, 1) + dt.timedelta(days=730)
    assert (frame["dosage_units"] > 0).all()
    # Rows are in date order; (order_id, line) identifies a line; lines count from 1 inside an order.
    assert frame["date"].is_sorted()
    assert frame.select(pl.struct("order_id", "line").is_unique().all()).item()
    assert frame.group_by("order_id").agg(ok=(pl.col("line").sort() == pl.int_range(1, pl.len() + 1)).all(),
                                          one=pl.col("customer").n_unique() == 1,
                                          day=pl.col("date").n_unique() == 1).select(
        pl.all_horizontal("ok", "one", "day").all()).item()


def test_identifiers_are_well_formed(frame: pl.DataFrame) -> None:
    # CSOS order number: YY + X + 6 characters (21 CFR 1305.21(b)), YY the order's year.
    assert frame["order_id"].str.contains(r"^\d\dX[0-9A-Z]{6}$").all()
    assert (frame["order_id"].str.slice(0, 2) == frame["date"].dt.strftime("%y")).all()
    # DEA numbers: 2 letters (or letter + 9) and 7 digits with a valid check digit (domain.md §5).
    for dea in frame["customer"].unique().to_list():
        assert len(dea) == 9 and dea[0].isalpha() and (dea[1].isalpha() or dea[1] == "9")
        d = [int(c) for c in dea[2:]]
        assert ((d[0] + d[2] + d[4]) + 2 * (d[1] + d[3] + d[5])) % 10 == d[6]
    assert frame["ndc"].str.contains(r"^\d{5}-\d{4}-\d{2}$").all()
    # One class of trade and one state per customer.
    per = frame.group_by("customer").agg(pl.col("customer_type").n_unique(), pl.col("state").n_unique())
    assert (per["customer_type"] == 1).all() and (per["state"] == 1).all()
    assert set(frame["customer_type"].unique()) == set(CLASSES)
    assert frame["state"].n_unique() >= 8


def test_deterministic_for_a_seed() -> None:
    a = synthesize(customers=60, days=400, seed=5)
    b = synthesize(customers=60, days=400, seed=5)
    c = synthesize(customers=60, days=400, seed=6)
    assert a.equals(b)
    assert not a.equals(c)


def test_every_kind_is_labelled(frame: pl.DataFrame) -> None:
    kinds = frame.filter("label").group_by("anomaly").agg(lines=pl.len(), customers=pl.col("customer").n_unique())
    counts = dict(zip(kinds["anomaly"], kinds["customers"]))
    assert set(counts) == set(ANOMALY_KINDS)
    assert all(n >= 5 for n in counts.values()), counts
    details = set(frame.filter(pl.col("anomaly") == "pattern")["anomaly_detail"].unique())
    assert details == {"new_family", "mix_shift", "controlled_share"}
    # Label and anomaly agree; anomalies are rare, as suspicious orders are.
    assert (frame["label"] == (frame["anomaly"] != "")).all()
    assert 0.002 < frame["label"].mean() < 0.03
    # Anomalies start after enough history to judge them (six months here).
    assert frame.filter("label")["date"].min() >= dt.date(2024, 6, 1)


def test_benign_events_exist(frame: pl.DataFrame) -> None:
    benign = frame.filter(~pl.col("label"))
    restocks = benign.filter(pl.col("anomaly_detail") == "restock")
    assert restocks["customer"].n_unique() > 100
    # Restocks are bigger than the series' typical order, but at most about twice it.
    typical = benign.group_by("customer", "family").agg(median=pl.col("dosage_units").median())
    ratio = restocks.join(typical, on=["customer", "family"])
    ratio = ratio["dosage_units"] / ratio["median"]
    assert 1.2 < ratio.median() < 2.3
    # Benign new families: common among peers of the same class, not high-risk, unlabelled.
    new = benign.filter(pl.col("anomaly_detail") == "benign_new_family")
    assert new["customer"].n_unique() >= 10
    assert not set(new["family"].unique()) & {"oxycodone", "oxymorphone", "fentanyl", "methadone", "hydromorphone"}
    # Non-controlled lines ride on orders too (1305.21(c)), never labelled.
    assert 0.05 < (~frame["controlled"]).mean() < 0.4
    assert not frame.filter(~pl.col("controlled") & pl.col("label")).height
    # Some large customers are over the fixed cap in ordinary months (the cap's false positives).
    monthly = _monthly(frame)
    assert monthly.filter(~pl.col("labelled") & (pl.col("units") > MONTHLY_CAP)).height > 50


def test_size_anomalies_are_several_usual_months(frame: pl.DataFrame) -> None:
    monthly = _monthly(frame)
    usual = monthly.filter(~pl.col("labelled")).group_by("customer", "family").agg(usual=pl.col("units").median())
    size = monthly.filter(pl.col("kinds").list.contains("size")).join(usual, on=["customer", "family"])
    ratio = size["units"] / size["usual"]
    assert ratio.min() > 2.5 and 3.5 < ratio.median() < 9.0


def test_frequency_anomalies_shorten_the_interval(frame: pl.DataFrame) -> None:
    gaps = (frame.filter(pl.col("controlled")).unique(["customer", "family", "date"])
            .sort("customer", "family", "date")
            .with_columns(gap=pl.col("date").diff().dt.total_days().over("customer", "family")))
    usual = gaps.filter(~pl.col("label")).group_by("customer", "family").agg(usual=pl.col("gap").median())
    burst = (gaps.filter(pl.col("anomaly") == "frequency").group_by("customer", "family")
             .agg(burst=pl.col("gap").median()).join(usual, on=["customer", "family"]))
    assert (burst["burst"] * 2.5 <= burst["usual"]).mean() > 0.9
    assert (burst["usual"] >= 12).all()  # fortnightly or slower customers (medians carry jitter)


def test_new_family_anomalies_are_rare_among_peers(frame: pl.DataFrame) -> None:
    new = frame.filter(pl.col("anomaly_detail") == "new_family").select("customer", "customer_type", "family").unique()
    adoption = (frame.filter(~pl.col("label")).select("customer", "customer_type", "family").unique()
                .group_by("customer_type", "family").agg(n=pl.len())
                .join(frame.group_by("customer_type").agg(total=pl.col("customer").n_unique()), on="customer_type")
                .with_columns(share=pl.col("n") / pl.col("total")))
    joined = new.join(adoption, on=["customer_type", "family"], how="left").with_columns(pl.col("share").fill_null(0))
    assert (joined["share"] < 0.2).all()
    # The customer never ordered the family before the anomaly.
    first = frame.group_by("customer", "family").agg(first_label=pl.col("label").sort_by("date").first())
    assert new.join(first, on=["customer", "family"])["first_label"].all()


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_write_by_extension(tmp_path, suffix: str) -> None:
    small = synthesize(customers=20, days=120, seed=3)
    path = tmp_path / f"history{suffix}"
    write_synthetic(small, str(path))
    back = pl.read_parquet(path) if suffix == ".parquet" else pl.read_csv(path, try_parse_dates=True)
    assert back.height == small.height
    assert back["dosage_units"].sum() == small["dosage_units"].sum()
    with pytest.raises(ValueError):
        write_synthetic(small, str(tmp_path / "history.xlsx"))


def test_short_histories_have_no_anomalies() -> None:
    """Nothing is unusual without a history to compare with."""
    short = synthesize(customers=200, days=60, seed=1)
    assert short.height > 0 and not short["label"].any()
    assert synthesize(customers=1, days=1, seed=1).columns == NATIVE + ["label", "anomaly", "anomaly_detail"]
    with pytest.raises(ValueError):
        synthesize(customers=0)


def test_the_history_stays_within_the_dates_the_scorer_takes() -> None:
    from gateway.som.errors import SomError
    from gateway.som.io import DATE_RANGE, read_orders

    last = synthesize(customers=5, days=214, seed=1, start=dt.date(2099, 6, 1))
    assert last["date"].max() <= DATE_RANGE[1] and read_orders(last).height == last.height
    for kwargs, code in (({"days": 215, "start": dt.date(2099, 6, 1)}, "som_bad_dates"),
                         ({"days": 10, "start": dt.date(1969, 12, 31)}, "som_bad_dates"),
                         ({"days": 0}, "som_bad_dates"), ({"customers": 0}, "som_bad_customers"),
                         ({"seed": -1}, "som_bad_seed")):
        with pytest.raises(SomError) as err:
            synthesize(**{"customers": 5, **kwargs})
        assert err.value.code == code, kwargs


def test_customers_have_distinct_dea_numbers_up_to_the_limit() -> None:
    """Past a million customers _dea_numbers drew with replacement: customers shared numbers."""
    from gateway.som.errors import SomError
    from gateway.som.synth import MAX_CUSTOMERS, _dea_numbers

    rng = np.random.default_rng(0)
    numbers = _dea_numbers(rng, rng.integers(0, len(CLASSES), MAX_CUSTOMERS))
    assert np.unique(numbers).size == MAX_CUSTOMERS
    with pytest.raises(SomError) as err:
        synthesize(customers=MAX_CUSTOMERS + 1, days=1)
    assert err.value.code == "som_bad_customers"
