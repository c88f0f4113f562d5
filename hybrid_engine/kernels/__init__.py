"""Kernels of the engine: Triton JIT kernels, each with a plain-torch reference beside it.

The model calls only `get_ops(device, attention_backend)` and the ops of the returned `KernelOps`.
"""
from .backend import BACKENDS, KernelOps, get_ops, resolve_backend

__all__ = ["BACKENDS", "KernelOps", "get_ops", "resolve_backend"]
