"""The serving path, measured against a real teacher server in its own process: its CPU per image above the
in-process forward, the transport's floor, the client's side, bytes on the wire, micro-batching across clients,
two tenants on one teacher, a key alone, and the ledger's billing time at scale."""
