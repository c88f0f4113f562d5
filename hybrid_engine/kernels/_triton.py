"""Lazy access to Triton, shared by the kernel modules.

Kernels are written as plain functions and turned into `triton.jit` objects on first launch: Triton decides at
decoration time whether a kernel runs compiled or in the interpreter (TRITON_INTERPRET=1), so decorating at import
would freeze that choice before a test or the CLI had a chance to set the variable.
"""
from __future__ import annotations

import functools
import os


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def jit(fn):
    """`triton.jit(fn)`, made once per function on first use."""
    import triton

    return triton.jit(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def jit_helpers(module_globals: dict, names: tuple[str, ...]) -> None:
    """Replace a module's device-helper functions by their `triton.jit` versions (once, before the first launch),
    so that kernels calling them by global name see jitted functions."""
    for name in names:
        fn = module_globals[name]
        if callable(fn) and not hasattr(fn, "fn"):
            module_globals[name] = jit(fn)
