"""The guard engine: GuardReasoner prompt and parser, batcher, cache, backends, evaluation.

Knows nothing of Kafka; usable on its own (see `guardstream moderate` and `evaluate`).
"""
