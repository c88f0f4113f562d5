"""Time a kernel call the way a decode step sees it: replayed from one CUDA graph, each call on its own copy of its
operands, so weights and caches come from HBM rather than L2 (a layer never finds the previous layer's weights in
L2)."""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from .._workspace import capture_graph

REPS = 20  # calls per graph, and so the operand copies a bench makes: 20 weight matrices rotate well past L2


def graph_us(fn: Callable[[int], object], reps: int = REPS, replays: int = 7) -> float:
    """Median over `replays` of us per call of `fn(i)` (i = 0..reps-1: the copy it reads), from one CUDA graph of
    `reps` back-to-back calls."""
    g, _ = capture_graph(lambda: [fn(i) for i in range(reps)])  # warmed up and captured as the engine does
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
