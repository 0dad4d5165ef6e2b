"""Placeholder package: arrives with its own issue."""
