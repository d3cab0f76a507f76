"""Metrics and baselines used by pipelines and benchmarks."""
