"""Helpers for tests and benchmarks: a real server on loopback in this process, and a throw-away TLS CA."""
