"""Benchmarks of the Platform master; run each as a module from the repository root,
e.g. ``python -m bench.registry_fanout`` (see docs/performance.md)."""
