"""The caller's key and what it is billed: who is calling (auth.py), the content digest binding a request id to its
inputs (content_digest.py), the ledger side of a request (biller.py: stored answers, quota holds, the bill), the
replay payload's logits (replay_logits.py), and the quota state on the wire (quota_status.py). Imports nothing else of
the service."""
