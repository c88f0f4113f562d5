"""Decode-step kernel counts and GPU idle time from a profiler trace (bench/step_profile.py), on synthetic traces."""
from __future__ import annotations

import pytest

from hybrid_engine.bench.step_profile import busy_us, parse_decode_steps


def _launch(corr: int, ts: float) -> dict:
    return {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": ts, "dur": 2.0, "args": {"correlation": corr}}


def _kernel(corr: int, ts: float, dur: float, cat: str = "kernel", name: str = "k") -> dict:
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def test_busy_time_is_the_union_of_overlapping_spans():
    assert busy_us([(0, 2), (1, 3), (5, 6), (5.5, 5.75)]) == pytest.approx(4.0)
    assert busy_us([]) == 0.0


def test_decode_steps_are_the_most_common_graph_launch_and_idle_is_span_minus_busy():
    events = [_launch(1, 0.0)] + [_kernel(1, 10 + 20 * i, 15) for i in range(5)]  # a prefill graph: 5 kernels
    t = 200.0
    for step in range(4):  # decode graphs: 3 kernels each, 1 us apart -> idle 2 us per step
        corr = 10 + step
        events.append(_launch(corr, t))
        events += [_kernel(corr, t + 5 + 11 * i, 10 + step * (i == 2), name="gemv" if i else "norm")
                   for i in range(3)]
        events.append(_kernel(100 + step, t + 45, 1, "gpu_memcpy"))  # the token copy outside the graph
        t += 100
    out = parse_decode_steps(events)
    assert out["kernels_per_step"] == 3 and out["steps_profiled"] == 4
    assert out["gpu_busy_us_per_step"] == pytest.approx(31.5)  # 30, 31, 32, 33
    assert out["gpu_idle_us_per_step"] == pytest.approx(2.0)
    assert out["kernel_us_by_name"] == {"gemv": [2, pytest.approx(21.5)], "norm": [1, pytest.approx(10.0)]}
    assert out["other_gpu_ops_per_step"] == pytest.approx(3 / 3)  # copies between the first and last decode step


def test_a_trace_without_graph_kernels_is_refused():
    with pytest.raises(ValueError, match="inside a CUDA graph"):
        parse_decode_steps([_kernel(1, 0.0, 1.0), _kernel(2, 3.0, 1.0)])  # one kernel per launch: no graph
