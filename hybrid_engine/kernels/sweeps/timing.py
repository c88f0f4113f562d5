"""Time a kernel call the way a decode step sees it: replayed from one CUDA graph, each call on its own copy of its
operands, so weights and caches come from HBM rather than L2 (a layer never finds the previous layer's weights in
L2)."""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from .._workspace import reserve_for_capture

REPS = 20  # calls per graph, and so the operand copies a bench makes: 20 weight matrices rotate well past L2


def graph_us(fn: Callable[[int], object], reps: int = REPS, replays: int = 7) -> float:
    """Median over `replays` of us per call of `fn(i)` (i = 0..reps-1: the copy it reads), from one CUDA graph of
    `reps` back-to-back calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), reserve_for_capture():  # the split kernels' graph-side buffers, made outside it
        for i in range(reps):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):  # the warm-up's stream, as the engine captures: per-stream workspaces exist
        for i in range(reps):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    del g
    return statistics.median(times)
