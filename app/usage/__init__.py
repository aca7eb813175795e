"""Usage: the calling key's budget (``/v1/usage``) and the admin reports built from the ledger."""
