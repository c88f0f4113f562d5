"""Batching on the GPU: decode step time by batch, batch invariance, concurrent streams vs one at a time, and
batch-1 latency (the `--batch1-only` part runs on any version of the engine's public API, for same-lease A/B).

  python benchmarks/batch_bench.py --out results.json            # everything, llama-2-7b-shape
  python benchmarks/batch_bench.py --batch1-only --out a.json    # TTFT p50 at 10..500 tokens, TPOT
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from hybrid_engine import LLM, SamplingParams

from load import serial_vs_concurrent

LENGTHS = (10, 50, 100, 200, 500)


def _ids(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def batch1(llm: LLM, runs: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for n in LENGTHS:  # warm-up: every bucket once (and captured where the policy captures on demand)
        for _ in range(3):
            llm.generate({"prompt_token_ids": _ids(gen, n, vocab)}, one)
    if llm.graphs is not None:
        llm.graphs.worker.wait_idle(300)
    ttft = {}
    for n in LENGTHS:
        xs = []
        for _ in range(runs):
            ids = _ids(gen, n, vocab)
            t0 = time.perf_counter()
            llm.generate({"prompt_token_ids": ids}, one)
            xs.append((time.perf_counter() - t0) * 1e3)
        ttft[str(n)] = statistics.median(xs)
    tp = []
    for _ in range(max(5, runs // 6)):
        ids = _ids(gen, 100, vocab)
        t0 = time.perf_counter()
        llm.generate({"prompt_token_ids": ids}, one)
        t1 = time.perf_counter()
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))
        t2 = time.perf_counter()
        tp.append(((t2 - t1) - (t1 - t0)) * 1e3 / 127)
    return {"ttft_p50_ms": ttft, "tpot_p50_ms": statistics.median(tp)}


def decode_step_by_batch(llm: LLM, vocab: int) -> dict:
    """GPU time of one replayed decode step with B sequences at ~128 cached tokens (CUDA events)."""
    gen = torch.Generator().manual_seed(2)
    out = {}
    for b in llm.graphs.decode_buckets:
        streams = [llm.stream_deltas({"prompt_token_ids": _ids(gen, 128, vocab)},
                                     SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)) for _ in range(b)]
        for s in streams:
            next(s)
        assert llm.stats()["requests_running"] == b
        s_ = llm.stream_ctx
        with torch.cuda.stream(s_):
            s_.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):  # writes past the rows' allocated blocks land in the scratch block
                llm.graphs.replay_decode(b)
            end.record()
            end.synchronize()
        out[str(b)] = start.elapsed_time(end) / 20
        for s in streams:
            s.close()
    return out


def invariance(llm: LLM, vocab: int, prompts: int = 64, tokens: int = 128, batch: int = 16) -> dict:
    gen = torch.Generator().manual_seed(3)
    ps = [{"prompt_token_ids": _ids(gen, int(torch.randint(8, 200, (1,), generator=gen)), vocab)} for _ in range(prompts)]
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, sp)[0].outputs[0].token_ids for p in ps]
    llm.reset_prefix_cache()  # batching alone is compared: the batched prompts must not reuse the alone runs' KV
    together = []
    for i in range(0, prompts, batch):
        together += [o.outputs[0].token_ids for o in llm.generate(ps[i:i + batch], sp)]
    same = sum(a == t for a, t in zip(alone, together))
    first_diff = [next((j for j, (x, y) in enumerate(zip(a, t)) if x != y), None) for a, t in zip(alone, together)]
    return {"prompts": prompts, "tokens": tokens, "batch": batch, "agreement": same / prompts,
            "first_divergence": [d for d in first_diff if d is not None]}


def concurrent_streams(llm: LLM, vocab: int, clients: int = 32, prompt: int = 128, tokens: int = 128) -> dict:
    """`clients` threads streaming at once vs the same requests one after another (in-process, no HTTP)."""
    gen = torch.Generator().manual_seed(4)
    ps = [{"prompt_token_ids": _ids(gen, prompt, vocab)} for _ in range(clients)]
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    def request(i: int) -> tuple[list[float], list[int]]:
        times, toks = [], []
        for d in llm.stream_deltas(ps[i], sp):
            times.append(time.perf_counter())
            toks += d.token_ids
        return times, toks

    return {**serial_vs_concurrent(request, clients, tokens, between=llm.reset_prefix_cache), "prompt_tokens": prompt}


def chunk_prefill_ms(llm: LLM, vocab: int, prompt: int, chunk: int) -> float:
    """GPU time of the last chunk of a `prompt`-token prefill (the longest context a chunk attends over)."""
    blocks = llm.scheduler.blocks
    table = blocks.allocator.allocate(blocks.blocks_for(prompt))
    gen = torch.Generator().manual_seed(6)
    ids, s_ = _ids(gen, chunk, vocab), llm.stream_ctx
    sp = SamplingParams(max_tokens=1, temperature=0)
    try:
        with torch.cuda.stream(s_):
            llm.runner.prefill_chunk(ids, prompt - chunk, 0, table, sp, 0, 0, final=False)  # warm-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                llm.runner.prefill_chunk(ids, prompt - chunk, 0, table, sp, 0, 0, final=False)
            end.record()
            end.synchronize()
    finally:
        blocks.allocator.free(table)
    return start.elapsed_time(end) / 5


def long_prompt_while_decoding(llm: LLM, vocab: int, streams: int = 8, prompt: int = 2000) -> dict:
    """`streams` sequences decode; a `prompt`-token request arrives: the streams' worst inter-token gap while it
    is prefilled (in chunks of prefill_chunk_size), against one chunk's GPU time. Gaps are taken twice: as each
    stream's consumer thread sees its deltas (which includes waiting for the GIL among 9 threads), and at the
    engine's hand-over of each delta (`EngineCore._deliver`, wrapped here), which does not."""
    gen = torch.Generator().manual_seed(5)
    sp = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    running = [llm.stream_deltas({"prompt_token_ids": _ids(gen, 128, vocab)}, sp) for _ in range(streams)]
    for s in running:
        next(s)
    gaps: list[float] = []
    window = {"on": False}
    handed: dict[int, list[float]] = {}  # per sequence: engine hand-over times (s) while the window is on
    deliver = llm.core._deliver

    def timed_deliver(seq, delta) -> None:
        if window["on"]:
            handed.setdefault(id(seq), []).append(time.perf_counter())
        deliver(seq, delta)

    llm.core._deliver = timed_deliver

    def consume(s) -> None:
        last = time.perf_counter()
        for _ in s:
            now = time.perf_counter()
            if window["on"]:
                gaps.append((now - last) * 1e3)
            last = now

    threads = [threading.Thread(target=consume, args=(s,)) for s in running]
    for t in threads:
        t.start()
    time.sleep(0.2)
    chunks0 = llm.stats()["prefill_chunks"]
    window["on"] = True
    t0 = time.perf_counter()
    llm.generate({"prompt_token_ids": _ids(gen, prompt, vocab)}, SamplingParams(max_tokens=1, temperature=0))
    ttft = (time.perf_counter() - t0) * 1e3
    window["on"] = False
    llm.core._deliver = deliver
    for s in running:
        s.close()
    for t in threads:
        t.join()
    chunk = llm.config.prefill_chunk_size
    engine_gaps = [(b - a) * 1e3 for times in handed.values() for a, b in zip(times, times[1:])]
    return {"streams": streams, "prompt_tokens": prompt, "chunk_tokens": chunk,
            "chunks": llm.stats()["prefill_chunks"] - chunks0, "long_prompt_ttft_ms": ttft,
            "worst_gap_ms": max(gaps) if gaps else None, "gap_p50_ms": statistics.median(gaps) if gaps else None,
            "worst_gap_engine_ms": max(engine_gaps) if engine_gaps else None,
            "gap_p50_engine_ms": statistics.median(engine_gaps) if engine_gaps else None,
            "chunk_prefill_ms": chunk_prefill_ms(llm, vocab, prompt, chunk)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch1-only", action="store_true")
    ap.add_argument("--parts", default="batch1,steps,invariance,concurrent,long",
                    help="which measurements (batch1, steps, invariance, concurrent, long)")
    ap.add_argument("--batch-invariant", choices=["on", "off"], default=None,
                    help="EngineConfig.batch_invariant (default: the engine's; not passed to engines without it)")
    ap.add_argument("--batched-prefill", action="store_true", help="EngineConfig.batched_prefill")
    ap.add_argument("--decode-buckets", default=None, help="EngineConfig.decode_buckets, comma-separated (e.g. 16)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    parts = set(("batch1",) if args.batch1_only else args.parts.split(","))
    opts = {} if args.batch_invariant is None else {"batch_invariant": args.batch_invariant == "on"}
    if args.batched_prefill:
        opts["batched_prefill"] = True
    if args.decode_buckets is not None:
        opts["decode_buckets"] = tuple(int(b) for b in args.decode_buckets.split(","))
    llm = LLM(args.model, capture="eager", **opts)
    vocab = llm.model_config.vocab_size
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res = {"card": card, "model": args.model, "torch": torch.__version__, **opts,
           "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    steps = {"batch1": lambda: batch1(llm, args.runs, vocab), "steps": lambda: decode_step_by_batch(llm, vocab),
             "invariance": lambda: invariance(llm, vocab), "concurrent": lambda: concurrent_streams(llm, vocab),
             "long": lambda: long_prompt_while_decoding(llm, vocab)}
    names = {"steps": "decode_step_ms_by_batch", "invariance": "batch_invariance", "concurrent": "concurrent_streams",
             "long": "long_prompt_while_decoding"}
    for part, run in steps.items():
        if part in parts:
            res[names.get(part, part)] = run()
            print(json.dumps(res[names.get(part, part)]), flush=True)
            with open(args.out, "w") as f:  # after every part: a time limit keeps what is done
                json.dump(res, f, indent=1)
    if not args.batch1_only:
        res["stats"] = {k: v for k, v in llm.stats().items() if isinstance(v, (int, float, str, dict))}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
