"""Benchmark scripts (run as `python bench/NAME.py`); results go to BENCHMARKS.md. See bench/README.md."""
