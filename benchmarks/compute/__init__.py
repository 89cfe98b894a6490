"""In-process measurements of the model's compute: the masked teacher's throughput at each keep, where its time goes,
the FLOP model against `FlopCounterMode`, the machine's rate per dtype, prepared shapes, mixed keep counts in one
micro-batch, a student's attention kernel, OpenMP teams, and the training step."""
