"""The gRPC service: the server's lifecycle (server.py), the servicer, the interceptors (key first, errors to
statuses), TLS, and the billing core that answers a request (inference.py); `wire/` reads a request's bytes,
`accounting/` knows the caller's key and bills it."""
