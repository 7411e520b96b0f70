"""Measurement: entity extraction quality now; retrieval, drafting and speed benchmarks later."""
