"""Device facts and reusable scratch for kernels that split their work across programs and merge the parts in the
last-arriving program (split-K GEMV, split-key cached-prefill attention)."""
from __future__ import annotations

import torch

_SM_COUNT: dict[int, int] = {}
_SPLIT_BUFFERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def split_buffers(device: torch.device, numel: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partials [numel] and zeroed int32 arrival counters [counters], made once per (device, current stream,
    sizes) and reused: calls on one stream run in order and the kernels leave the counters at zero, so a graph
    replay needs no memset. Keyed by stream because the engine's capture worker warms a graph up on its own stream
    while requests run on theirs: two launches in flight at once must not share counters. Made on the first
    (warm-up) call, before capture; a first call inside a capture allocates from the graph's pool, and the graph
    then zeroes the counters itself on every replay (correct, one memset more)."""
    key = (str(device), _stream_id(device), numel, counters)
    bufs = _SPLIT_BUFFERS.get(key)
    if bufs is None:
        bufs = (torch.empty(numel, dtype=torch.float32, device=device),
                torch.zeros(counters, dtype=torch.int32, device=device))
        _SPLIT_BUFFERS[key] = bufs
    return bufs


def clear_split_buffers() -> None:
    """Drop every reused workspace (a benchmark sweeping many shapes and streams between graphs); no graph captured
    with them may be replayed afterwards."""
    _SPLIT_BUFFERS.clear()
