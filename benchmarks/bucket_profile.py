"""GPU time per kernel inside one prefill bucket's CUDA graph, or the decode graph (llama-2-7b-shape): where a
replay goes.

    PYTHONPATH=. python3 benchmarks/bucket_profile.py [--length 200] [--decode] [--json out.json]

Captures every bucket (capture="eager"), stages one request of --length tokens, then profiles REPLAYS replays of
that bucket's graph with CUPTI (kernels inside a graph are recorded one by one) and prints, per kernel name, the GPU
time per replay and the launches per replay, plus the kernel sum against the replay's wall time on CUDA events
(the difference is the gaps between kernels).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_engine import LLM, SamplingParams  # noqa: E402
from hybrid_engine.runtime.graphs import DECODE  # noqa: E402

REPLAYS = 5


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-2-7b-shape")
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--decode", action="store_true", help="profile the decode graph (after a --length prompt)")
    p.add_argument("--json")
    args = p.parse_args()
    llm = LLM(args.model, capture="eager")
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate({"prompt_token_ids": list(range(3, 3 + args.length))}, sp)  # stages the bucket's inputs
    bucket = (DECODE, 1) if args.decode else llm.graphs.bucket_for(args.length)
    graph = llm.graphs.graphs[bucket]  # decode: each replay advances the position on the device (15 in all)
    walls = []
    with torch.cuda.stream(llm.stream_ctx):
        for _ in range(10):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            graph.replay()
            e1.record()
            e1.synchronize()
            walls.append(e0.elapsed_time(e1) * 1e3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(REPLAYS):
                graph.replay()
            torch.cuda.current_stream().synchronize()
    agg: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            a = agg[e.name[:90]]
            a[0] += e.device_time_total
            a[1] += 1
    rows = sorted(((n, t / REPLAYS, c / REPLAYS) for n, (t, c) in agg.items()), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    wall = statistics.median(walls)
    print(f"bucket {bucket} ({args.length} tokens): replay {wall:.1f} us on events, kernel sum {total:.1f} us, "
          f"{sum(r[2] for r in rows):.0f} kernels; gaps ~{wall - total:.1f} us")
    for n, t, c in rows[:30]:
        print(f"{t:9.1f} us {c:5.0f}x {t / max(c, 1):7.2f} us/launch  {n}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "bucket": bucket,
                                               "length": args.length, "replay_us": wall, "kernel_sum_us": total,
                                               "kernels": [{"name": n, "us": t, "launches": c} for n, t, c in rows]},
                                              indent=1))


if __name__ == "__main__":
    main()
