"""The teacher engine: loading the teacher, the start-up dtype check, decoding requests into kept patches, the
micro-batcher, staging, the forward (eager, compiled or packed) and what a request costs (metering)."""
