"""Profile one decode step and one prefill step of llama-2-7b-shape (JIT path): GPU time per kernel family."""
from __future__ import annotations

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from hybrid_engine import LLM, SamplingParams


def table(prof, title: str, steps: int) -> None:
    agg: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            a = agg[e.name[:60]]
            a[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            a[1] += 1
    total = sum(v[0] for v in agg.values())
    print(f"== {title}: {total / steps / 1e3:.3f} ms GPU per step, {sum(v[1] for v in agg.values()) / steps:.0f} kernels")
    for name, (t, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"{t / steps:9.1f} us {n / steps:6.0f}x  {name}")


def main() -> None:
    llm = LLM(sys.argv[1] if len(sys.argv) > 1 else "llama-2-7b-shape", capture="off")
    ids = list(range(3, 103))
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=11, ignore_eos=True))
    table(prof, "100-token prefill + 10 decode steps (per request)", 1)
    r = llm.runner
    with torch.cuda.stream(llm.stream_ctx), torch.inference_mode():
        for _ in range(3):
            r.decode_step(1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                r.decode_step(1)
            torch.cuda.synchronize()
    table(prof, "decode step", 10)
    scratch = r.scratch_buffers()  # KV writes go nowhere (slot -1); valid_len must not exceed the step length
    for n in (16, 224, 512):
        with torch.cuda.stream(llm.stream_ctx), torch.inference_mode():
            scratch.valid_len.fill_(n)
            r.prefill_step(n, scratch)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    r.prefill_step(n, scratch)
                torch.cuda.synchronize()
        table(prof, f"prefill step, {n} tokens", 5)


if __name__ == "__main__":
    main()
