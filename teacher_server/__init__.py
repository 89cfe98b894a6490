"""MaskedKD teacher server: the gRPC service, its batching, metering and ledger.

The masked forward, the FLOP model, checkpoints and precision live in the core package `maskedkd`.
"""
