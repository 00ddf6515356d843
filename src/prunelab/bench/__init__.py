"""Benchmark building blocks: datasets, model zoo, training loop, records."""
