"""Cold start and serving-while-capturing, with the background worker (capture="idle").

Loads the model, serves the first request at once (JIT prefill, decode graph taken at load), then sends 100-token
requests with think times just around the worker's quiet period, so that many of them arrive while a bucket is
being captured; reports TTFT of requests that overlapped a capture, of those that did not, and after all graphs
were ready. Run it twice: with an empty TRITON_CACHE_DIR and with a warm one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from hybrid_engine import LLM, SamplingParams

from phases import PhaseTimer, pct



def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": statistics.median(xs) if xs else None, "p99": pct(xs, 0.99) if xs else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--steady-runs", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    llm = LLM(args.model, capture="idle")
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    vocab = llm.model.args.vocab_size
    p = SamplingParams(max_tokens=1, temperature=0)

    def request() -> tuple[float, bool]:
        ids = torch.randint(3, vocab, (args.length,), generator=g).tolist()
        capturing = llm.stats()["capturing"]
        ttft = llm.generate({"prompt_token_ids": ids}, p)[0].metrics.ttft_s * 1e3
        return ttft, capturing or llm.stats()["capturing"]

    with PhaseTimer(llm) as pt:  # where the first request's time goes, against a second JIT request at once
        first, _ = request()
        phases = {"first": pt.take()}
        second, _ = request()  # before the worker's first idle window: the JIT path again
        phases["second"] = pt.take()
    during, jit_only = [], []
    think = random.Random(0)
    quiet = llm.graphs.worker.quiet_s
    deadline = time.monotonic() + 60
    while llm.stats()["graphs_pending"] and time.monotonic() < deadline:
        time.sleep(think.uniform(quiet - 0.01, quiet + 0.06))
        ttft, overlapped = request()
        (during if overlapped else jit_only).append(ttft)
    ready_s = time.perf_counter() - t0
    llm.graphs.worker.wait_idle(timeout=60)
    steady = [request()[0] for _ in range(args.steady_runs)]
    st = llm.stats()
    res = {"model": args.model, "prompt_len": args.length, "load_s": load_s, "first_request_ttft_ms": first,
           "second_request_ttft_ms": second, "request_phases_ms": phases,
           "all_graphs_ready_after_load_s": ready_s - load_s, "ttft_while_capturing_ms": summary(during),
           "ttft_between_captures_ms": summary(jit_only), "ttft_steady_ms": summary(steady),
           "graphs_captured": st["graphs_captured"], "graphs_failed": st["graphs_failed"],
           "graph_pool_bytes": st["graph_pool_bytes"],
           "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR", "default (~/.triton/cache)")}
    res["first_over_steady"] = first / res["ttft_steady_ms"]["p50"]
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    llm.close()


if __name__ == "__main__":
    main()
