"""Benchmarks: each module runs as `python -m benchmarks.<name>` and writes results/<name>.json."""
