"""Lazy access to Triton, shared by the kernel modules.

Kernel modules do not import triton: their kernels are plain functions (`tl` is bound into the module on first
launch) turned into `triton.jit` objects by `jit(fn)` on first use. Triton decides when it is first imported, and
for each kernel when it is decorated, whether code runs compiled or under the interpreter (TRITON_INTERPRET=1, how
the CPU runs the kernels), so importing hybrid_engine must not freeze that choice.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreter_active() -> bool:
    """Whether Triton runs (or, once imported, will run) in interpreter mode. False when triton was imported
    before TRITON_INTERPRET=1 was set: its own library functions are then compiled-mode and cannot interpret."""
    if not interpreter_enabled():
        return False
    if "triton.language" not in sys.modules:
        return True
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


@functools.cache
def jit(fn):
    """`triton.jit(fn)`, made once per function on first use; binds `tl` (and the module's Triton constants,
    via its optional `_init_triton_globals(tl)`) into the function's module first."""
    import triton
    import triton.language as tl

    module_globals = fn.__globals__
    if module_globals.get("tl") is None:
        module_globals["tl"] = tl
        init = module_globals.get("_init_triton_globals")
        if init is not None:
            init(tl)
    return triton.jit(fn)


def jit_helpers(module_globals: dict, names: tuple[str, ...]) -> None:
    """Replace a module's device-helper functions by their `triton.jit` versions (once, before the first launch),
    so that kernels calling them by global name see jitted functions."""
    for name in names:
        fn = module_globals[name]
        if callable(fn) and not hasattr(fn, "fn"):
            module_globals[name] = jit(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
