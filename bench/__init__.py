"""Benchmarks of stochdepth_kernels; ``python -m bench`` (``make bench``) runs them."""
