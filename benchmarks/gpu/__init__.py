"""The GPU: the bf16 masked forward's share of the card's peak (a section of `make bench`), and the one prepared GPU
run (`python -m benchmarks --gpu`): its plan, its script and its report, docs/gpu.md."""
