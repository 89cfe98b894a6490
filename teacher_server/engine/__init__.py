"""The teacher engine, in three rooms that import downwards: `rows/` (a request's rows: decode, staging, running,
answers), `teacher/` (loading, the dtype check, the forwards, metering) and `batching/` (the micro-batcher);
`served_model.py` puts them together under the name clients use."""
