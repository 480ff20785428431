"""Serving-time code: what runs a pruned model's 2:4 weights at inference. ``kernels`` (PyTorch core's
semi-structured 2:4 kernels and where they run), ``decode_safe`` (a Linear that takes the sparse kernel
only where it was measured faster). The benchmark uses it; it imports ``apt`` and never the benchmark.
"""
