"""The gRPC service: the server's lifecycle, the servicer, the interceptors (key first, errors to statuses), who is
calling, TLS, request decoding, and the billing core that answers a request (inference.py)."""
