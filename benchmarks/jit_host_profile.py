"""Host cost of the JIT path (the first request after load runs it): launches per prefill and host time per op.

    PYTHONPATH=. python3 benchmarks/jit_host_profile.py [--length 100] [--out DIR]

Loads with capture="off" (the JIT path only), times `runner.prefill_step` wall-clock (host enqueue, then the GPU
drains) at one length, A/B in one process: the lean JIT prefill loop (models/llama_jit.py), LlamaModel.forward,
and that without the Triton launch cache; and profiles three steps with torch.profiler CPU + CUDA activities: host time per op and
kernel-launch API, launches per step, and how long the GPU idles waiting for the host. Also times the first request
after load separately from a warm one, on fresh prompts, to split one-time costs from per-launch costs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_engine import LLM, SamplingParams  # noqa: E402
import hybrid_engine.runtime.runner as runner_mod  # noqa: E402
from hybrid_engine.kernels._triton import set_fast_launch  # noqa: E402
from phases import PhaseTimer  # noqa: E402


def no_lean(*args) -> None:
    """Stands in for models.llama_jit.jit_prefill: the runner then runs LlamaModel.forward."""
    return None


def request_phases(llm: LLM, ids: Any, sp: SamplingParams, rounds: int) -> dict[str, float]:
    """Where a JIT request's time goes beyond its prefill step (phases.PhaseTimer), interleaved round by round with
    a bare `prefill_step` on the request's own staged buffers (A/B in one process)."""
    r, s = llm.runner, llm.stream_ctx
    times: dict[str, list[float]] = defaultdict(list)
    with PhaseTimer(llm) as pt:
        for rnd in range(rounds + 2):
            t0 = time.perf_counter()
            out = llm.generate(ids(), sp)[0]
            wall = (time.perf_counter() - t0) * 1e3
            phases = pt.take()
            with torch.cuda.stream(s), torch.inference_mode():  # the same step again on the buffers it just used
                s.synchronize()
                t1 = time.perf_counter()
                type(r).prefill_step(r, len(out.prompt_token_ids))
                t2 = time.perf_counter()
                s.synchronize()
                t3 = time.perf_counter()
            if rnd < 2:  # discarded warm-up rounds
                continue
            for k, v in phases.items():
                times[k].append(v)
            times["generate_wall"].append(wall)
            times["ttft"].append(out.metrics.ttft_s * 1e3)
            times["bare_step_enqueue"].append((t2 - t1) * 1e3)
            times["bare_step_wall"].append((t3 - t1) * 1e3)
    res = {k: round(statistics.median(v), 3) for k, v in times.items()}
    print("request phases (ms, p50):", json.dumps(res))
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-2-7b-shape")
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="/tmp/out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(args.model, capture="off")
    fast_default = set_fast_launch(True)
    set_fast_launch(fast_default)
    vocab = llm.model.args.vocab_size
    gen = torch.Generator().manual_seed(0)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def ids() -> dict:
        return {"prompt_token_ids": torch.randint(3, vocab, (args.length,), generator=gen).tolist()}

    firsts = []
    for _ in range(3):  # the first is the first request after load; the others show the steady JIT TTFT
        t = time.perf_counter()
        llm.generate(ids(), sp)
        firsts.append((time.perf_counter() - t) * 1e3)
    r, s = llm.runner, llm.stream_ctx
    phases = request_phases(llm, ids, sp, args.rounds)
    scratch = r.scratch_buffers()
    scratch.valid_len.fill_(args.length)
    # A/B in one process (host speed differs between processes and machines by up to 2x), interleaved round by
    # round, two discarded rounds first: the lean JIT prefill loop, LlamaModel.forward, and that without the cache
    variants = {"lean_loop": (True, runner_mod.jit_prefill), "model_forward": (True, no_lean),
                "model_forward_no_launch_cache": (False, no_lean)}
    walls: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    with torch.cuda.stream(s), torch.inference_mode():
        for rnd in range(args.rounds + 2):
            for name, (fast, lean) in variants.items():
                set_fast_launch(fast)
                runner_mod.jit_prefill = lean
                s.synchronize()
                t0 = time.perf_counter()
                r.prefill_step(args.length, scratch)
                t1 = time.perf_counter()
                s.synchronize()
                if rnd >= 2:
                    walls[name].append(((t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3))
        set_fast_launch(fast_default)
        runner_mod.jit_prefill = variants["lean_loop"][1]
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                r.prefill_step(args.length, scratch)
            s.synchronize()
    host: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    launches = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None:
            h = host[e.name[:70]]
            h[0] += e.cpu_time_total / 3
            h[1] += 1 / 3
        if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"):
            launches += 1
    summary = {
        "device": torch.cuda.get_device_name(),
        "length": args.length,
        "first_requests_ms": [round(x, 3) for x in firsts],
        "request_phases_ms_p50": phases,
        "prefill_step_ms_p50": {v: {"enqueue": round(statistics.median(w[0] for w in ws), 3),
                                    "wall": round(statistics.median(w[1] for w in ws), 3)} for v, ws in walls.items()},
        "kernel_launches_per_step": round(launches / 3, 1),
        "host_us_per_step_top": {k: [round(v[0], 1), round(v[1], 1)] for k, v in
                                 sorted(host.items(), key=lambda kv: -kv[1][0])[:30]},
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "host_us_per_step_top"}, indent=1))
    for k, (us, n) in list(summary["host_us_per_step_top"].items())[:20]:
        print(f"{us:9.1f} us {n:6.1f}x  {k}")
    (out / "jit_host_profile.json").write_text(json.dumps(summary, indent=1))
    prof.export_chrome_trace(str(out / "jit_host_trace.json"))


if __name__ == "__main__":
    main()
