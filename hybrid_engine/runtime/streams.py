"""The serving stream, made current on the calling thread only around the host's GPU work (staging, a replay or a
JIT step, the token read-back's copy): `torch.cuda.stream(s)` costs 50-100 us of host time per use on the GPU hosts
measured (it builds Stream objects under device guards), and a request pays it on its critical path. `StreamScope`
does the same through torch's C bindings in a few microseconds, restoring the previous stream and device on exit."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch


class StreamScope:
    """`with scope:` makes `stream` current (and its device) on this thread; nests; restores both on exit. One
    thread at a time per scope object (the engine uses its scope only while holding its request lock)."""

    __slots__ = ("stream", "_ids", "_saved")

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        self._ids = (stream.stream_id, stream.device_index, stream.device_type)
        self._saved: list[tuple[int, tuple]] = []

    def __enter__(self) -> "StreamScope":
        device = torch._C._cuda_getDevice()
        self._saved.append((device, torch._C._cuda_getCurrentStream(self._ids[1])))
        torch._C._cuda_setStream(*self._ids)  # also makes the stream's device current
        return self

    def __exit__(self, *exc: Any) -> None:
        device, prev = self._saved.pop()
        torch._C._cuda_setStream(*prev)
        if device != self._ids[1]:
            torch._C._cuda_setDevice(device)


def stream_scope(stream: torch.cuda.Stream | None) -> StreamScope | nullcontext:
    """StreamScope for `stream`; on the CPU (no stream) a reusable no-op context."""
    return StreamScope(stream) if stream is not None else nullcontext()
