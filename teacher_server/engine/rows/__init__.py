"""A request's rows on their way through the teacher: decoded and validated at the boundary (decode.py), copied once
into reused buffers (staging.py, shared_host.py for the ingest workers), run as one batch (rows_runner.py) and
answered with its logits and extra outputs (answers.py). Imports nothing else of the engine."""
