"""One helper for the engine's per-thread switches (the graph plan, the between-layers hook)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def local_setting(local: threading.local, name: str, value: Any) -> Iterator[None]:
    """Within the block, on this thread only, `local.<name>` is `value`; the previous value (None if unset) after."""
    prev = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, prev)
