"""Talking to the teacher: channels and TLS, the requests' bytes (wire), shared-memory pixels, retries and
resends, the sync / async clients and the streams that keep several calls in flight."""
