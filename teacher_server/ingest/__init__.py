"""Ingest workers (`serve --ingest-workers N`): several processes receive, check, digest, queue and bill requests on
one port; the one device process runs their sealed micro-batches (ARCHITECTURE.md, "Ingest workers")."""
