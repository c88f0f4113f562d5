"""Kernels per decode step and the GPU's idle time between them, from a profiler trace of graph-replayed steps.

A request's decode steps replay one CUDA graph each. In the profiler's (Kineto's) Chrome trace, every kernel a graph
runs carries the correlation id of the launch that replayed it (the engine launches graphs through the driver API,
so the launch itself may be missing from the host side of the trace), while a plain launch has one kernel per
correlation id: kernels sharing an id are one graph replay. The decode graph is the replay size seen most often
(prefill buckets run once per request). For each such step:
`kernels` (inside the graph), `busy` (the union of its kernels' durations) and `idle` (its first kernel's start to
its last kernel's end, minus busy: the gaps a launch chain leaves, which programmatic dependent launch and fusion
attack), and `kernel_us_by_name` (per kernel name, its launches and summed duration per step: where the step's time
goes). Work outside the graphs (copies, the host's table updates) is counted per step apart.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import Counter, defaultdict
from typing import Any, Callable

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
NAME_CHARS = 80  # cuBLAS kernel names run to hundreds of characters


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) spans."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def parse_decode_steps(events: list[dict[str, Any]]) -> dict[str, Any]:
    """{kernels_per_step, gpu_busy_us_per_step, gpu_idle_us_per_step, other_gpu_ops_per_step, steps_profiled,
    kernel_us_by_name} from
    Chrome-trace events (medians over the decode steps); ValueError when no kernel ran inside a graph."""
    by_id: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    names: dict[Any, list[str]] = defaultdict(list)  # per correlation id, the kernel names in by_id's order
    for e in events:
        if e.get("cat") in GPU_CATEGORIES:
            start, corr = float(e["ts"]), e.get("args", {}).get("correlation")
            by_id[corr].append((start, start + float(e.get("dur", 0.0))))
            names[corr].append(str(e.get("name", "?"))[:NAME_CHARS])
    groups = {c: spans for c, spans in by_id.items() if c is not None and len(spans) > 1}
    outside = [s for c, spans in by_id.items() if c not in groups for s, _ in spans]
    if not groups:
        raise ValueError("no kernel in the trace ran inside a CUDA graph (is the decode graph captured?)")
    size, _ = Counter(len(g) for g in groups.values()).most_common(1)[0]
    step_ids = sorted((c for c, g in groups.items() if len(g) == size), key=lambda c: min(s for s, _ in groups[c]))
    steps = [groups[c] for c in step_ids]
    busy = [busy_us(g) for g in steps]
    span = [max(e for _, e in g) - min(s for s, _ in g) for g in steps]
    first, last = min(s for s, _ in steps[0]), max(e for _, e in steps[-1])
    between = sum(1 for t in outside if first <= t <= last)  # copies and kernels outside the graphs, decode phase
    return {"kernels_per_step": size, "gpu_busy_us_per_step": round(statistics.median(busy), 2),
            "gpu_idle_us_per_step": round(statistics.median(sp - b for sp, b in zip(span, busy)), 2),
            "other_gpu_ops_per_step": round(between / max(1, len(steps) - 1), 2), "steps_profiled": len(steps),
            "kernel_us_by_name": _by_name([(names[c], groups[c]) for c in step_ids])}


def _by_name(steps: list[tuple[list[str], list[tuple[float, float]]]], top: int = 16) -> dict[str, list[float]]:
    """{kernel name: [launches per step, median summed us per step]} for the `top` names by time, largest first."""
    per_step: list[dict[str, float]] = []
    for step_names, spans in steps:
        total: dict[str, float] = defaultdict(float)
        for name, (s, e) in zip(step_names, spans):
            total[name] += e - s
        per_step.append(total)
    counts = Counter(steps[-1][0]) if steps else Counter()  # the same graph every step: one step's counts
    med = {n: statistics.median(t.get(n, 0.0) for t in per_step) for n in counts}
    ranked = sorted(med, key=med.get, reverse=True)[:top]
    return {n: [counts[n], round(med[n], 2)] for n in ranked}


def profile_decode_steps(run: Callable[[], Any]) -> dict[str, Any]:
    """Run `run()` (e.g. one request of ~50 tokens) under the CUDA profiler and parse its decode steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    return parse_decode_steps(events)
