"""Benchmarks of drep-kernels against the unfused baseline (see benchmarks/README.md)."""
