"""The ledger at rest: the SQL archive, its drainer, the streaming export and usage rollups."""
