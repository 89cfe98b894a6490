"""A whole run: checks before it starts, the per-worker loop (in-process or on Ray Train), checkpoints and resume,
evaluation, metrics and the progress reports."""
