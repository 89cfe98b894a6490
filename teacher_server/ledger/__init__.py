"""The billing ledger: tables, opening and migrating a database, API keys, billing writes, reports, refusal counts."""
