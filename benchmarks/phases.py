"""Where one request's time goes: host time of each phase (instance wrappers, ~1 us each) and the GPU time of its
prefill (CUDA events around the JIT step or the graph replay).

    with PhaseTimer(llm) as pt:
        llm.generate(...)
        phases = pt.take()   # {"submit": ms, "stage": ms, "prefill_enqueue" | "replay_enqueue": ms,
                             #  "push": ms, "pop_wait": ms, "prefill_gpu": ms}

`pop_wait` is how long the host waited for the first token after enqueueing everything: large when the GPU is the
bottleneck (or late), ~0 when the host is. `prefill_gpu` spans the GPU from the prefill's first launch to its last
(it includes GPU idle gaps while a host-bound JIT step is still enqueueing).
"""
from __future__ import annotations

import time
from typing import Any

import torch


class PhaseTimer:
    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.cuda = llm.device.type == "cuda"
        self.times: dict[str, float] = {}
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        r = llm.runner
        self._targets = [(llm, "_submit", "submit", False), (r, "stage_prefill", "stage", False),
                         (r, "prefill_step", "prefill_enqueue", True), (llm.reader, "push", "push", False),
                         (llm.reader, "pop", "pop_wait", False)]
        if llm.graphs is not None:
            self._targets.append((llm.graphs, "replay_prefill", "replay_enqueue", True))

    def __enter__(self) -> "PhaseTimer":
        for obj, attr, key, gpu in self._targets:
            setattr(obj, attr, self._wrap(getattr(obj, attr), key, gpu and self.cuda))
        return self

    def __exit__(self, *exc: Any) -> None:
        for obj, attr, *_ in self._targets:
            obj.__dict__.pop(attr, None)

    def take(self) -> dict[str, float]:
        """The phases of the request(s) since the last take(), in ms."""
        times, self.times = self.times, {}
        if self._events is not None:
            start, end = self._events
            end.synchronize()
            times["prefill_gpu"] = start.elapsed_time(end)
            self._events = None
        return {k: round(v, 3) for k, v in times.items()}

    def _wrap(self, fn: Any, key: str, gpu: bool) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            if gpu:
                self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                self._events[0].record()
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.times[key] = self.times.get(key, 0.0) + (time.perf_counter() - t) * 1e3
                if gpu:
                    self._events[1].record()
        return wrapper


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of the samples; nan for none."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")
