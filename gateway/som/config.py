"""Thresholds of suspicious order monitoring (21 CFR 1301.74(b), 21 USC 832).

DEA sets no numeric thresholds: every number here is configuration with a default that a
compliance team is expected to review. A line is flagged when any of its severities (feature
value divided by its threshold) reaches 1; the score is the largest severity.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any


class SomConfigError(ValueError):
    """A configuration value is unknown or out of range."""

    code = "som_config_invalid"


def _setting(name: str, value: Any, whole: bool) -> int | float:
    """A setting's value as a number (text such as "2.5" too): finite, and for a whole-number
    setting whole (2.5 would otherwise be cut to 2 without a word)."""
    if isinstance(value, bool):  # int(True) is 1
        raise SomConfigError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        raise SomConfigError(f"{name}: must be a finite number, got {value!r}") from None
    except (TypeError, ValueError):
        raise SomConfigError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SomConfigError(f"{name}: must be a finite number, got {value!r}")
    if not whole:
        return number
    if not number.is_integer():
        raise SomConfigError(f"{name}: must be a whole number, got {value!r}")
    return value if isinstance(value, int) else int(number)


@dataclass(frozen=True)
class SomConfig:
    # Size against the customer's own history (trailing 12 complete months, 6 for the maximum).
    min_history_months: int = 3          # months of history before the customer is judged on it
    min_history_lines: int = 3           # lines in the trailing 12 months before order size is judged
    size_ratio: float = 4.0              # line units / mean line size of the trailing 12 months
    size_over_max6: float = 3.0          # line units / largest line of the trailing 6 months
    control_z: float = 5.0               # log-size control limit, in robust standard deviations
    control_sd_floor: float = 0.25       # floor on the log-size spread (very regular customers)
    month_ratio: float = 4.0             # month-to-date units / trailing 12-month monthly average,
                                         # for a line at least the customer's mean line
    # Size against the peer group (class of trade, state, family), from a fixed reference table.
    peer_z: float = 4.0                  # log line size above the peers' log mean, in peer sd
    peer_month_z: float = 4.0            # log month-to-date units above the peers' monthly log mean,
                                         # for a line above the peers' typical line
    min_peer_customers: int = 5          # fewer peers: fall back to (class of trade, family), then family
    # Frequency.
    frequency_ratio: float = 2.0         # order days in the last 30 days / usual order days a month
    frequency_min_interval_ratio: float = 1.5  # ...while the recent interval is still this much
                                         # shorter than usual (no echo once a burst is over)
    min_orders_30d: int = 4              # fewer order days in 30 days are never a frequency finding
    interval_ratio: float = 2.0          # usual interval / mean of the last `recent_intervals` intervals
    recent_intervals: int = 3
    # Pattern.
    new_family_tenure_days: int = 180    # a new family is judged only for an established customer
    new_family_window_days: int = 180    # lines this long after a family's first order count as new
    new_family_peer_share: float = 0.25  # a new family ordered by fewer peers than this is unusual
    sustained_ratio: float = 1.5         # mean of the last `sustained_orders` order days, the
                                         # largest left out (a restock), / usual order day (for a
                                         # full year of history, not below last year's season)
    sustained_orders: int = 3
    sustained_today: float = 1.2         # ...while today is still this much above the usual day
    mix_odds_ratio: float = 15.0        # odds of a family's share of the customer's units, last 30
                                         # days against the trailing months since it was first ordered
    controlled_odds_ratio: float = 30.0  # odds of the controlled share, last 30 days against 12 months
    min_mix_units: float = 500.0         # family units in 30 days below this never make a mix finding
    min_mix_days: int = 3                # customer order days in 30 days needed to judge a share
    # Monthly dosage-unit cap per family (litigation method 4 uses 8,000). Judged for customers
    # with history, when the month also exceeds their largest month of the trailing 12 by
    # `cap_over_usual` (a customer whose ordinary month is above the cap has an approved higher
    # volume and is judged by the other findings); only the line that takes the month over counts.
    monthly_cap: float = 8000.0
    cap_over_usual: float = 1.4          # ...and this far above the largest month of the trailing
                                         # 12 (a customer that has always stayed under the cap)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SomConfigError(f"{f.name}: expected a number, got {value!r}")
            if not math.isfinite(value):  # NaN never compares, inf never flags: no threshold
                raise SomConfigError(f"{f.name}: must be a finite number, got {value!r}")
            if value < 0:
                raise SomConfigError(f"{f.name}: must not be negative, got {value!r}")
            if isinstance(getattr(type(self), f.name), int) and value != int(value):
                raise SomConfigError(f"{f.name}: must be a whole number, got {value!r}")
        if not 1 <= self.recent_intervals <= 30:
            raise SomConfigError("recent_intervals: must be between 1 and 30")
        if not 2 <= self.sustained_orders <= 30:
            raise SomConfigError("sustained_orders: must be between 2 and 30")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SomConfig":
        """Settings by name (numbers, or numbers written as text); whole-number settings take
        only whole numbers (2.5 is refused, not cut to 2). SomConfigError for anything else."""
        if not isinstance(data, Mapping):
            raise SomConfigError(f"expected a table of SOM settings, got {data!r}")
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise SomConfigError(f"unknown SOM settings {sorted(unknown, key=str)}")
        values = {name: _setting(name, value, isinstance(getattr(cls, name), int))
                  for name, value in data.items()}
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path, section: str = "som") -> "SomConfig":
        """Read the `[som]` table of a TOML file (e.g. the home's gateway.toml); absent: defaults."""
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        return cls.from_dict(data.get(section, {}) or {})

    def with_(self, **changes: Any) -> "SomConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
