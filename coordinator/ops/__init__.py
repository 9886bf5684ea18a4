"""Commands that read the catalog: list and check."""
