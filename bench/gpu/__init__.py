"""Benchmarks that want a GPU: backend throughput and latency against the decode roofline."""
