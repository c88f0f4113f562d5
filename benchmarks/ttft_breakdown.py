"""Where a request's TTFT goes on the graph path: host phases, the prefill graph's GPU time, and a profiler trace.

    PYTHONPATH=. python3 benchmarks/ttft_breakdown.py [--lengths 10,100,200] [--out DIR]
    PYTHONPATH=. python3 benchmarks/ttft_breakdown.py --lengths 84 --cached-starts 0,496,1008,1952 --no-trace

For each prompt length: the harness-style TTFT (generate, max_tokens=1, ids in, token ids out), the host time of
each phase (wrapping the runner's stage / replay and the token reader's push / pop with perf_counter), and the GPU
time of the bucket's graph replay alone (CUDA events on the serving stream, back to back). Writes a JSON summary and
a Chrome trace of three requests at the longest length.

With --cached-starts (an agent's turn: new tokens after a cached history), each length is measured after each
start's worth of cached tokens (a multiple of the block size; the prefix is sent once first so its blocks are
cached): the phases above (before_stage then includes the prefix-cache lookup) and the GPU time of the
prefill-after-cached-positions graph of the bucket.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_engine import LLM, SamplingParams  # noqa: E402


class PhaseClock:
    """Wraps bound methods so each call appends (name, t_start, t_end) in perf_counter seconds."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float]] = []

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.marks.append((name, t0, time.perf_counter()))

        setattr(obj, attr, timed)


def replay_gpu_ms(llm: LLM, key, reps: int) -> float:
    """Median GPU time (ms) of the graph `key` (a prefill bucket, or (CONTEXT, bucket)) replayed alone on the
    serving stream (CUDA events), on whatever request is staged."""
    gpu = []
    with torch.cuda.stream(llm.stream_ctx):
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            llm.graphs.graphs[key].replay()
            e1.record()
            e1.synchronize()
            gpu.append(e0.elapsed_time(e1))
    return round(statistics.median(gpu), 4)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-2-7b-shape")
    p.add_argument("--lengths", default="10,100,200")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", default="/tmp/out")
    p.add_argument("--cached-starts", default="",
                   help="cached prefix lengths, comma-separated multiples of the block size: each length after each")
    p.add_argument("--no-trace", action="store_true", help="skip the bucket sweep and the profiler trace")
    p.add_argument("--host-profile", action="store_true",
                   help="also cProfile the host part of each (length, start)'s requests up to the prefill's staging "
                        "(host_profile_<length>_at_<start>.txt under --out)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    llm = LLM(args.model, capture="eager")
    print(f"loaded + captured in {time.perf_counter() - t0:.1f} s; {llm.stats()['graphs']}", flush=True)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rng = torch.Generator().manual_seed(0)
    vocab = llm.model.args.vocab_size
    clock = PhaseClock()
    clock.wrap(llm.runner, "stage_prefill", "stage")
    clock.wrap(llm.graphs, "replay_prefill", "replay")
    clock.wrap(llm.reader, "push", "push")
    clock.wrap(llm.reader, "pop", "pop")
    clock.wrap(llm.graphs, "replay_context_prefill", "replay")
    starts = [int(v) for v in args.cached_starts.split(",")] if args.cached_starts else [None]
    summary = {}
    for start in starts:
        prefix = cached_prefix(llm, rng, vocab, sp, start)
        for n in [int(v) for v in args.lengths.split(",")]:
            row = measure(llm, clock, rng, vocab, sp, n, start, prefix, args.runs)
            if args.host_profile:
                host_profile(llm, rng, vocab, sp, n, prefix, args.runs, out / f"host_profile_{n}_at_{start or 0}.txt")
            summary[n if start is None else f"{n}@{start}"] = row
            print(n if start is None else f"{n} new after {start} cached", row, flush=True)
    if args.no_trace:
        write(out, summary, {})
        llm.close()
        return
    buckets = {}
    for b in llm.graphs.buckets:  # GPU time of every bucket's graph, staged by a real request of that length
        llm.generate({"prompt_token_ids": random_ids(rng, vocab, b)}, sp)
        buckets[b] = replay_gpu_ms(llm, b, 7)
    print("bucket replay GPU ms:", buckets, flush=True)
    n = max(summary)
    from torch.profiler import ProfilerActivity, profile, record_function

    ids = random_ids(rng, vocab, n)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            with record_function(f"request_{i}"):
                llm.generate({"prompt_token_ids": ids}, sp)
    prof.export_chrome_trace(str(out / "ttft_trace.json"))
    write(out, summary, buckets)
    llm.close()


def random_ids(rng: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=rng).tolist()


def cached_prefix(llm: LLM, rng: torch.Generator, vocab: int, sp: SamplingParams, start: int | None) -> list[int]:
    """`start` fresh token ids whose blocks are now in the prefix cache (one request of them plus a token); [] for
    None or 0. `start` must be a multiple of the block size."""
    if not start:
        return []
    if start % llm.kv.block_size:
        raise SystemExit(f"--cached-starts {start}: must be a multiple of the block size {llm.kv.block_size}")
    prefix = random_ids(rng, vocab, start)
    llm.generate({"prompt_token_ids": prefix + random_ids(rng, vocab, 1)}, sp)
    return prefix


def host_profile(llm: LLM, rng: torch.Generator, vocab: int, sp: SamplingParams, n: int, prefix: list[int],
                 runs: int, path: Path) -> None:
    """cProfile of `runs` requests of `n` fresh tokens after the cached `prefix` (as `measure` sends them) from
    generate() until the runner stages the prefill: the host part of TTFT that grows with a cached history. Top 40
    by own and by cumulative time."""
    import cProfile
    import io
    import pstats

    prof, stage = cProfile.Profile(), llm.runner.stage_prefill

    def stop_then_stage(*a, **kw):
        prof.disable()
        return stage(*a, **kw)

    llm.runner.stage_prefill = stop_then_stage
    try:
        for _ in range(runs):
            ids = prefix + random_ids(rng, vocab, n)
            prof.enable()
            llm.generate({"prompt_token_ids": ids}, sp)
            prof.disable()
    finally:
        llm.runner.stage_prefill = stage
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(40)
    path.write_text(text.getvalue())


def write(out: Path, summary: dict, buckets: dict) -> None:
    (out / "ttft_breakdown.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                         "lengths": summary,
                                                         "bucket_replay_gpu_ms": buckets}, indent=1))


def measure(llm: LLM, clock: PhaseClock, rng: torch.Generator, vocab: int, sp: SamplingParams, n: int,
            start: int | None, prefix: list[int], runs: int) -> dict:
    """Median phases of `runs` requests of `n` fresh tokens (after `prefix`, `start` cached tokens, or alone)."""
    from hybrid_engine.runtime.graphs import CONTEXT

    def rand(k: int) -> list[int]:
        return random_ids(rng, vocab, k)

    for _ in range(3):
        llm.generate({"prompt_token_ids": prefix + rand(n)}, sp)
    per: dict[str, list[float]] = {k: [] for k in ("total", "engine_ttft", "before_stage", "stage", "replay",
                                                      "push", "pop_wait", "after_pop")}
    hits = llm.stats()["prefix_cache_hit_tokens"]
    for _ in range(runs):
        prompt = {"prompt_token_ids": prefix + rand(n)}
        clock.marks.clear()
        a = time.perf_counter()
        res = llm.generate(prompt, sp)[0]
        b = time.perf_counter()
        m = {name: (s, e) for name, s, e in clock.marks}
        per["total"].append(b - a)
        per["engine_ttft"].append(res.metrics.ttft_s)
        per["before_stage"].append(m["stage"][0] - a)
        for k in ("stage", "replay", "push"):
            per[k].append(m[k][1] - m[k][0])
        per["pop_wait"].append(m["pop"][1] - m["pop"][0])
        per["after_pop"].append(b - m["pop"][1])
    bucket = llm.graphs.bucket_for(n)
    row = {k: round(statistics.median(v) * 1e3, 4) for k, v in per.items()}
    row.update(bucket=bucket, replay_gpu_ms=replay_gpu_ms(llm, bucket if not start else (CONTEXT, bucket), 10),
               hit_tokens_per_request=(llm.stats()["prefix_cache_hit_tokens"] - hits) / runs)
    return row


if __name__ == "__main__":
    main()
