"""The 30-day windows kept as days arrive and leave (not re-summed per line) against the plain
Polars reference, with fractional units (where the order of additions could show) and gaps longer
than the window (where a window empties)."""

from __future__ import annotations

import numpy as np
import polars as pl

from gateway.som import kernels as K, reference
from gateway.som.score import score_orders

from .conftest import messy_history


def test_windows_with_fractional_units_and_long_gaps_agree_with_the_reference() -> None:
    df = messy_history(customers=80, days=500, seed=7)
    rng = np.random.default_rng(7)
    frac = rng.choice([0.1, 0.25, 1 / 3, 0.7], df.height)
    df = df.with_columns((pl.col("dosage_units") * frac).alias("dosage_units"))
    # a quiet spell of 45 days for every customer (the windows empty, then refill)
    df = df.filter(~pl.col("date").is_between(pl.date(2024, 6, 1), pl.date(2024, 7, 15)))
    batch = score_orders(df, keep_features=True)
    ref = reference.features(df)
    for col in ("orders_30d", "customer_days_30d", "share_30d", "controlled_30d",
                "mix_odds_ratio", "controlled_odds_ratio", "frequency_ratio", "score"):
        a = batch[col].cast(pl.Float64).to_numpy()
        b = ref[col].cast(pl.Float64).to_numpy()
        bad = ~np.isclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True)
        assert not bad.any(), f"{col}: {bad.sum()} lines differ"
    assert batch["flag"].equals(ref["flag"])
    assert (batch["customer_days_30d"] == 1).sum() > 0  # lines after the quiet spell
    assert K.G_SIZE == K.G_WIN + 3 and K.C_SIZE == K.C_TRAIL + 3 == K.C_WIN + 7
