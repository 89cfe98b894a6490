"""Benchmark suite of the MaskedKD service: `make bench` (full) or `python -m benchmarks --quick`.

Every section is measured in one run on one machine and reported as ratios, so that numbers taken on different
machines are never mixed. See `benchmarks/cli.py` for the sections and `docs/benchmarks.md` for the last run.
"""
