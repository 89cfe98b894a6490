"""The micro-batcher: requests queued fairly per API key (scheduler.py, fair_clock.py), large ones cut into chunks
(split_requests.py), a batch staged, run (forward_step.py), offered between the blocks of a long forward
(preemption.py) and committed in order (commit_stage.py); batcher.py runs the pipeline, batch_job.py is what it
queues. Imports the rows and teacher rooms, never served_model.py."""
