"""Benchmarks of the guard engine."""
