"""Benchmarks (`make bench`): never pytest tests, never timing assertions. See README.md, "Performance"."""
