"""Kernels: ``reference.py`` (plain PyTorch, the CPU path) and ``triton/`` (CUDA), one contract."""
