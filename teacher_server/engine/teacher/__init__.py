"""The teacher as served: loaded (teacher_loader.py) and checked in its dtype against float32 (fidelity.py), its
forward eager, compiled, in prepared shapes or as CUDA graphs (compiled.py, shape_buckets.py, cuda_graphs.py) or packed
without padding (packing.py), and what a request costs (metering.py). Imports the rows room only."""
