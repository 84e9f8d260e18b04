"""Benchmarks, loaders, validation and tokenisation (records in TOFU's schema)."""
