"""Device facts and reusable scratch for kernels that split their work across programs and merge the parts in the
last-arriving program (split-K GEMV, split-key cached-prefill attention)."""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import torch

_SM_COUNT: dict[int, int] = {}
_SPLIT_BUFFERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown buffers that captured graphs may still read


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


class _Reserving(threading.local):
    on = False


_RESERVING = _Reserving()


@contextlib.contextmanager
def reserve_for_capture():
    """While active on this thread, every `split_buffers` call (not capturing) also makes, zeroed, the buffers that a
    capture of the same call on the same stream will use. The graph runner warms a step up inside this before
    capturing it, so that no capture allocates one: memory a capture allocates comes from the pool every graph
    shares, where graphs captured earlier keep their intermediates (each replay of theirs would overwrite it), and
    the capture only records the counters' zero-fill instead of running it."""
    was, _RESERVING.on = _RESERVING.on, True
    try:
        yield
    finally:
        _RESERVING.on = was


def _fits(bufs: tuple[torch.Tensor, torch.Tensor] | None, numel: int, counters: int) -> bool:
    return bufs is not None and bufs[0].numel() >= numel and bufs[1].numel() >= counters


def _ensure(full_key: tuple, device: torch.device, numel: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    bufs = _SPLIT_BUFFERS.get(full_key)
    if not _fits(bufs, numel, counters):
        if bufs is not None:
            _RETIRED.append(bufs)
        bufs = (torch.empty(numel, dtype=torch.float32, device=device),
                torch.zeros(counters, dtype=torch.int32, device=device))
        _SPLIT_BUFFERS[full_key] = bufs
    return bufs


def split_buffers(device: torch.device, key: tuple, numel: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partials (at least `numel`) and zeroed int32 arrival counters (at least `counters`) of the kernel call
    named by `key`, made once and reused: calls on one stream run in order and the kernels leave the counters at
    zero, so a graph replay needs no memset.

    Keyed by stream and by whether the stream is capturing, so that no two launches that can run at once share
    them: requests run on the serving stream (JIT steps and graph replays, in order), while the capture worker
    warms graphs up on its own stream at the same time; the buffers a capture records are used only by the replays
    of the graphs captured with them, on the serving stream. Made outside any capture: on a call's first run, and
    for captures by the warm-up run under `reserve_for_capture`; a capture that finds none raises (the graph then
    fails to capture and its step stays on the JIT path). A call needing more than a key's buffers hold gets new
    ones; the old stay allocated, since a captured graph may still read them."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    stream = _stream_id(device)
    if capturing:
        bufs = _SPLIT_BUFFERS.get((str(device), stream, True, *key))
        if not _fits(bufs, numel, counters):
            raise RuntimeError(f"split buffers of {key} ({numel} partials, {counters} counters) were not reserved "
                               "before this capture: warm the step up under reserve_for_capture() first")
        return bufs
    if _RESERVING.on:
        _ensure((str(device), stream, True, *key), device, numel, counters)
    return _ensure((str(device), stream, False, *key), device, numel, counters)


def capture_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """A standalone CUDA graph of `fn()` (tests, benchmarks), made the engine's way: warmed up once with the split
    buffers reserved, then captured, both on one side stream. Returns the graph and what the captured call
    returned."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), reserve_for_capture():
        fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


def clear_split_buffers() -> None:
    """Drop every reused workspace (a benchmark sweeping many shapes and streams between graphs); no graph captured
    with them may be replayed afterwards."""
    _SPLIT_BUFFERS.clear()
    _RETIRED.clear()
