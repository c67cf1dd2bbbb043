"""Benchmarks: scripts that print figures (not tests). Entry point: benchmarks/bench_core.py."""
