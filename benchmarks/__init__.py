"""Benchmark suite of the MaskedKD service: `make bench` (full) or `python -m benchmarks --quick`.

Every section is measured in one run on one machine and reported as ratios, so that numbers taken on different
machines are never mixed. See `benchmarks/cli.py` for the sections and `docs/benchmarks.md` for the last run.

  cli, config, timing  the run: its sections, what it measures, and how it times
  compute/             the forward and the training step in-process: throughput per keep, FLOPs, dtypes, shapes
  serving/             a real teacher server in its own process and its clients: overhead, wire, tenants, ledger
  report/              docs/benchmarks.md from one run's results: sections, tables, targets, plots
  gpu/                 the one prepared GPU run (`python -m benchmarks --gpu`) and its report, docs/gpu.md
"""
