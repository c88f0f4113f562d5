"""Quick latency probe for development (the full harness is `hybrid-engine bench`).

Loads llama-2-7b-shape (fp16) with capture="eager", then reports TTFT at a few prompt lengths, per-token latency
(128 tokens, host read every token), the GPU time of one decode-graph replay, and graph-pool bytes. JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hybrid_engine import LLM, SamplingParams

from phases import pct


def replay_ms(llm: LLM, graph_key: str = "decode", iters: int = 50) -> float:
    g = llm.graphs.graphs[graph_key]
    s = llm.stream_ctx
    with torch.cuda.stream(s):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(5):
            g.replay()
        start.record()
        for _ in range(iters):
            g.replay()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--capture", default="eager")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--buckets", default=None, help="comma-separated prefill buckets")
    args = ap.parse_args()
    t0 = time.perf_counter()
    kw = {"prefill_buckets": tuple(int(b) for b in args.buckets.split(","))} if args.buckets else {}
    llm = LLM(args.model, capture=args.capture, attention_backend=args.backend, **kw)
    res = {"load_s": time.perf_counter() - t0, "stats": {}}
    g = torch.Generator().manual_seed(0)
    vocab = llm.model.args.vocab_size
    res["ttft_ms"] = {}
    for n in (10, 50, 100, 200, 500):
        xs = []
        for i in range(args.runs + 2):
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, temperature=0))[0]
            xs.append(out.metrics.ttft_s * 1e3)
        xs = xs[2:]
        res["ttft_ms"][n] = {"p50": statistics.median(xs), "p99": pct(xs, 0.99)}
    tp = []
    for i in range(5):
        ids = torch.randint(3, vocab, (20,), generator=g).tolist()
        deltas, last = [], time.perf_counter()
        for d in llm.stream_deltas({"prompt_token_ids": ids}, SamplingParams(max_tokens=128, ignore_eos=True,
                                                                             temperature=0)):
            now = time.perf_counter()
            deltas.append((now - last) * 1e3)
            last = now
        tp += deltas[1:]
    res["tpot_streamed_ms"] = {"p50": statistics.median(tp), "p99": pct(tp, 0.99)}
    if llm.graphs is not None and "decode" in llm.graphs.graphs:
        res["decode_replay_gpu_ms"] = replay_ms(llm)  # prefill graphs need a staged prompt: timed via TTFT
    st = llm.stats()
    res["stats"] = {k: v for k, v in st.items() if isinstance(v, (int, float, str))}
    print(json.dumps({k: v for k, v in res.items() if k != "stats"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
