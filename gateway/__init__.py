"""Controlled-substance signing gateway: CSOS orders, EPCS prescriptions, suspicious order monitoring."""

__version__ = "0.1.0"
