"""Suspicious order monitoring (21 CFR 1301.74(b), 21 USC 832): scoring of order lines by size,
frequency and pattern, in batch (`score_orders`) and incrementally (`incremental.SomState`)."""

from gateway.som.config import SomConfig, SomConfigError
from gateway.som.io import SomInputError, read_orders, write_scored
from gateway.som.peers import peer_reference
from gateway.som.score import LineScore, score_orders

__all__ = ["SomConfig", "SomConfigError", "SomInputError", "LineScore", "peer_reference",
           "read_orders", "score_orders", "write_scored"]
