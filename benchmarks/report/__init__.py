"""docs/benchmarks.md from one run's results: the header and machine, each section's tables, the targets checked
as PASS / MISS, and the plots."""
