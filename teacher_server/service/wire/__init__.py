"""A request's bytes as the server reads them: protobuf's wire format by hand (wire_format.py), bytes that do not parse
(decoding.py), the pixels viewed where they arrived (pixels_in_place.py), and the same-host path through a caller's
shared memory (shared_memory.py, peer_user.py: which user a loopback caller runs as). Imports nothing else of the
service."""
