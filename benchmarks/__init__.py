"""Benchmarks of ccat-packaging: run them with ``make bench`` (``python -m benchmarks``)."""
