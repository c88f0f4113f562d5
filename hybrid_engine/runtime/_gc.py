"""Keep Python's cyclic garbage collector from pausing a request.

A full (generation-2) collection scans every tracked object; after importing torch and transformers and loading a
model that is ~370k objects, and one such collection measured 285 ms on the development machine (CPU, Python 3.11).
One landing inside a request is a latency outlier. `freeze()` moves every object alive now into the permanent
generation, which collections skip (what vLLM does after loading and capturing graphs): the engine calls it when it
has loaded and when the capture worker has finished. Frozen objects are still freed by reference counting; only
cyclic garbage among them waits until `unfreeze()` (LLM.close(), and at interpreter exit, so that extension
modules see their objects released).
"""
from __future__ import annotations

import atexit
import gc

_exit_hook = False


def freeze() -> None:
    global _exit_hook
    gc.freeze()
    if not _exit_hook:
        _exit_hook = True
        atexit.register(gc.unfreeze)


def unfreeze() -> None:
    gc.unfreeze()
