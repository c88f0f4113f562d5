"""Prefix caching on the GPU (issue #19): what a cached prefix saves, what an agent loop gains, what unique prompts
pay, and whether fp16 outputs stay the same.

  python benchmarks/prefix_bench.py --out prefix.json                         # llama-2-7b-shape, fp16, GPU
  python benchmarks/prefix_bench.py --preset tiny-llama --small --out x.json  # CPU smoke run (small sizes)

One engine (capture="eager": every graph, prefix-hit buckets included, is captured before timing); "caching off"
runs switch the block manager's lookups and registrations off on the same engine (exactly what
enable_prefix_caching=False changes on the serving path), so on and off share the card, the weights and the graphs.

(a) TTFT of a 500-token prompt whose first 480 tokens are cached, against 20- and 50-token prompts (unique ids).
(b) Agent loop on token ids: a ~400-token system prompt with tools, then 12 turns, each adding the previous answer
    (50 tokens) and a new message (80 tokens), history to ~2,000 tokens; one conversation and 8 at once; TTFT per
    turn (from the second on), caching on and off.
(c) Unique prompts (nothing shared) at 10..500 tokens: batch-1 TTFT and TPOT, caching on vs off, interleaved.
(d) fp16 agreement: 64 multi-turn prompts (8 conversations x 8 turns) answered with their history cached, and again
    with caching off: share whose first 32 greedy tokens are identical.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import pstats
import statistics
import sys
import threading
import time

import torch

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.bench.hardware import card_name, versions
from hybrid_engine.bench.measure import summary

ONE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


class Sizes:
    """Token counts of the runs; `small` shrinks them for a CPU smoke run of the tiny preset."""

    def __init__(self, small: bool, runs: int) -> None:
        s = 4 if small else 1
        self.runs = runs
        self.prefix, self.suffix, self.short = 480 // s, 20 // s, 50 // s
        self.system, self.answer, self.message, self.turns = 400 // s, 50 // s, 80 // s, 12 if not small else 4
        self.conversations = 8 if not small else 2
        # conversations per setting whose turn-by-turn p50 is taken: the worst of 11 turns' p50s is biased upward by
        # their noise, which 3 samples each left at +-0.2 ms on the H200 (turn order not monotonic in the history)
        self.repeats = max(3, runs // 2) if not small else 1
        self.turn_gap_s = self.gap_ab_s = 0.0
        self.host_profile: str | None = None  # (b)'s single conversation profiled to this path
        self.lengths = (10, 50, 100, 200, 500) if not small else (10, 50)
        self.tpot_tokens = 128 if not small else 8
        self.tpot_runs = max(5, runs // 3) if not small else 2
        self.agree_conversations, self.agree_turns, self.agree_tokens = (8, 8, 32) if not small else (2, 2, 8)


class Ids:
    def __init__(self, vocab: int, seed: int) -> None:
        self.vocab, self.gen = vocab, torch.Generator().manual_seed(seed)

    def __call__(self, n: int) -> list[int]:
        return torch.randint(3, self.vocab, (n,), generator=self.gen).tolist()


@contextlib.contextmanager
def caching(llm: LLM, on: bool):
    blocks = llm.scheduler.blocks
    was, blocks.enable_caching = blocks.enable_caching, on
    try:
        yield
    finally:
        blocks.enable_caching = was


def ttft_ms(llm: LLM, ids: list[int]) -> float:
    t0 = time.perf_counter()
    llm.generate({"prompt_token_ids": ids}, ONE)
    return (time.perf_counter() - t0) * 1e3


def tpot_ms(llm: LLM, ids: list[int], params: SamplingParams) -> float:
    """Per token after the first: first delta to last delta over the tokens between (the prefill excluded)."""
    stream = llm.stream_deltas({"prompt_token_ids": ids}, params)
    next(stream)
    t0 = time.perf_counter()
    n = sum(len(d.token_ids) for d in stream)
    return (time.perf_counter() - t0) * 1e3 / n


def cached_prefix(llm: LLM, ids: Ids, z: Sizes) -> dict:
    """(a): the cached-prefix prompt and the short prompts, interleaved, same run."""
    prefix = ids(z.prefix)
    llm.generate({"prompt_token_ids": prefix + ids(z.suffix)}, ONE)  # caches the prefix's full blocks
    for _ in range(3):  # warm-up
        ttft_ms(llm, prefix + ids(z.suffix)), ttft_ms(llm, ids(z.suffix)), ttft_ms(llm, ids(z.short))
    hits0 = llm.stats()["prefix_cache_hit_tokens"]
    xs: dict[str, list[float]] = {"cached": [], "short": [], "50": []}
    for _ in range(z.runs):
        xs["cached"].append(ttft_ms(llm, prefix + ids(z.suffix)) / 1e3)
        xs["short"].append(ttft_ms(llm, ids(z.suffix)) / 1e3)
        xs["50"].append(ttft_ms(llm, ids(z.short)) / 1e3)
    hit = (llm.stats()["prefix_cache_hit_tokens"] - hits0) / z.runs
    c, s, f = summary(xs["cached"]), summary(xs["short"]), summary(xs["50"])
    return {"prompt_tokens": z.prefix + z.suffix, "cached_tokens": z.prefix, "hit_tokens_per_request": hit,
            "ttft_cached_prefix_ms": c["p50"], "ttft_20_ms": s["p50"], "ttft_50_ms": f["p50"],
            "ttft_cached_prefix": c, "ttft_20": s, "ttft_50": f,
            "cached_over_20": c["p50"] / s["p50"], "goal_cached_over_20": 1.2}


@contextlib.contextmanager
def stage_clock(llm: LLM, prof: cProfile.Profile | None = None):
    """perf_counter() at each call of the runner's prefill staging (the end of a request's host work before its
    prefill), in a list; for one conversation at a time. `prof`, if given, is disabled there (a turn enables it)."""
    runner, marks = llm.runner, []
    stage = runner.stage_prefill

    def timed(*a, **kw):
        if prof is not None:
            prof.disable()
        marks.append(time.perf_counter())
        return stage(*a, **kw)

    runner.stage_prefill = timed
    try:
        yield marks
    finally:
        del runner.stage_prefill


def conversation(llm: LLM, ids: Ids, z: Sizes, out: list[list[float]], answers: SamplingParams,
                 errors: list[str], new_tokens: list[list[int]], host: list[list[float]] | None = None,
                 prof: cProfile.Profile | None = None) -> None:
    """One agent conversation; appends its TTFT per turn (ms) to `out` and the prompt tokens each turn prefilled
    (not from the cache) to `new_tokens`, or what failed to `errors`. `z.turn_gap_s` between one turn's last token
    and the next turn (an agent's tool call; 0 by default). `host` (one conversation at a time): each turn's host
    time from the request to its prefill's staging (ms); `prof` profiles that time of every turn after the first."""
    history = ids(z.system)
    times, new, before = [], [], []
    clock = stage_clock(llm, prof) if host is not None else contextlib.nullcontext([])
    with clock as marks:
        _turns(llm, ids, z, history, times, new, before, marks, answers, errors, prof)
    if len(times) < z.turns:
        return
    out.append(times)
    new_tokens.append(new)
    if host is not None:
        host.append(before)


def _turns(llm: LLM, ids: Ids, z: Sizes, history: list[int], times: list[float], new: list[int],
           before: list[float], marks: list[float], answers: SamplingParams, errors: list[str],
           prof: cProfile.Profile | None) -> None:
    try:
        for turn in range(z.turns):
            if turn and z.turn_gap_s:
                time.sleep(z.turn_gap_s)
            history = history + ids(z.message)
            marks.clear()
            if prof is not None and turn:
                prof.enable()
            t0 = time.perf_counter()
            stream = llm.stream_deltas({"prompt_token_ids": history}, answers)
            first = next(stream)
            times.append((time.perf_counter() - t0) * 1e3)
            if prof is not None:
                prof.disable()  # (a turn that staged no prefill stops here)
            before.append((marks[0] - t0) * 1e3 if marks else float("nan"))
            deltas = [first, *stream]
            answer = [t for d in deltas for t in d.token_ids]
            m = deltas[-1].metrics
            new.append(m.prompt_tokens - m.cached_tokens if m is not None else -1)
            history = history + answer
    except Exception as e:  # noqa: BLE001 - reported by multi_turn, with the turn it happened in
        errors.append(f"turn {len(times) + 1}: {type(e).__name__}: {str(e)[:300]}")


def _median_measured(xs: list[float]) -> float | None:
    """The median of the values that are not NaN (a turn whose prefill was not staged), None if none is."""
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else None


def multi_turn(llm: LLM, vocab: int, z: Sizes, concurrent: int, profile_to: str | None = None) -> dict:
    """(b) with `concurrent` conversations at once; each setting (on, off) `repeats` times with fresh ids.
    `profile_to` (one conversation): a cProfile of the turns' host time before their prefills, caching on, written
    there (sorted by own time, then by cumulative time)."""
    prof = cProfile.Profile() if profile_to and concurrent == 1 else None
    answers = SamplingParams(max_tokens=z.answer, temperature=0, ignore_eos=True)
    res = {}
    for on in (True, False):
        per_turn: list[list[float]] = []
        new_tokens: list[list[int]] = []
        errors: list[str] = []
        host: list[list[float]] | None = [] if concurrent == 1 else None
        with caching(llm, on):
            for r in range(z.repeats):
                gens = [Ids(vocab, 1000 * r + 10 * c + on) for c in range(concurrent)]
                threads = [threading.Thread(target=conversation,
                                            args=(llm, g, z, per_turn, answers, errors, new_tokens, host,
                                                  prof if on else None))
                           for g in gens]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if errors:
                    raise RuntimeError(f"{len(errors)} of {concurrent} conversations failed (caching "
                                       f"{'on' if on else 'off'}, repeat {r}); first: {errors[0]}")
        if prof is not None and on:
            text = io.StringIO()
            for key in ("tottime", "cumulative"):
                pstats.Stats(prof, stream=text).sort_stats(key).print_stats(40)
            with open(profile_to, "w") as f:
                f.write(text.getvalue())
        p50 = [statistics.median(run[t] for run in per_turn) for t in range(z.turns)]
        res["on" if on else "off"] = p50
        res["new_on" if on else "new_off"] = [statistics.median(run[t] for run in new_tokens) for t in range(z.turns)]
        if host:
            res["host_on" if on else "host_off"] = [_median_measured([run[t] for run in host]) for t in range(z.turns)]
    return {"conversations": concurrent, "turns": z.turns, "system_tokens": z.system,
            "turn_tokens": z.answer + z.message, "history_tokens": z.system + z.turns * (z.answer + z.message),
            "multi_turn_ttft_p50_ms": res["on"][1:], "multi_turn_ttft_p50_ms_off": res["off"][1:],
            "first_turn_ttft_p50_ms": res["on"][0], "first_turn_ttft_p50_ms_off": res["off"][0],
            "worst_turn_p50_ms": max(res["on"][1:]), "worst_turn_p50_ms_off": max(res["off"][1:]),
            "prefilled_tokens_per_turn": res["new_on"], "prefilled_tokens_per_turn_off": res["new_off"],
            "turn_gap_ms": z.turn_gap_s * 1e3,
            **({"host_before_prefill_p50_ms": res["host_on"], "host_before_prefill_p50_ms_off": res["host_off"]}
               if "host_on" in res else {})}


def unique_prompts(llm: LLM, ids: Ids, z: Sizes) -> dict:
    """(c): TTFT per length and TPOT, on and off interleaved run by run (drift cancels)."""
    for n in z.lengths:  # warm-up
        for on in (True, False):
            with caching(llm, on):
                ttft_ms(llm, ids(n))
    ttft: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
    for n in z.lengths:
        for _ in range(z.runs):
            for on in (True, False):
                with caching(llm, on):
                    ttft[on].setdefault(str(n), []).append(ttft_ms(llm, ids(n)) / 1e3)
    tpot: dict[bool, list[float]] = {True: [], False: []}
    long = SamplingParams(max_tokens=z.tpot_tokens, temperature=0, ignore_eos=True)
    for _ in range(z.tpot_runs):
        for on in (True, False):
            with caching(llm, on):
                tpot[on].append(tpot_ms(llm, ids(100 if 100 in z.lengths else z.lengths[-1]), long))
    out = {}
    for on, name in ((True, "on"), (False, "off")):
        out[name] = {"ttft_ms": {n: {k: v for k, v in summary(xs).items() if k in ("p50", "p99")}
                                 for n, xs in ttft[on].items()},
                     "tpot_ms": {"p50": statistics.median(tpot[on])}}
    out["ttft_p50_on_over_off"] = {n: out["on"]["ttft_ms"][n]["p50"] / out["off"]["ttft_ms"][n]["p50"]
                                   for n in out["on"]["ttft_ms"]}
    out["tpot_p50_on_over_off"] = out["on"]["tpot_ms"]["p50"] / out["off"]["tpot_ms"]["p50"]
    out["goal_ratio_max"] = 1.03
    return out


def agreement(llm: LLM, vocab: int, z: Sizes) -> dict:
    """(d): multi-turn prompts answered with their history cached, then with caching off."""
    answers = SamplingParams(max_tokens=z.agree_tokens, temperature=0, ignore_eos=True)
    prompts, on_tokens, hits = [], [], []
    for c in range(z.agree_conversations):
        ids = Ids(vocab, 5000 + c)
        history = ids(z.system)
        for _ in range(z.agree_turns):
            history = history + ids(z.message)
            out = llm.generate({"prompt_token_ids": history}, answers)[0]
            prompts.append(history)
            on_tokens.append(out.outputs[0].token_ids)
            hits.append(out.num_cached_tokens)
            history = history + out.outputs[0].token_ids
    with caching(llm, False):
        off_tokens = [o.outputs[0].token_ids for o in
                      (llm.generate({"prompt_token_ids": p}, answers)[0] for p in prompts)]
    same = [a == b for a, b in zip(on_tokens, off_tokens)]
    diverge = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(on_tokens, off_tokens)]
    return {"prompts": len(prompts), "tokens": z.agree_tokens, "agreement": sum(same) / len(same),
            "goal": 0.95, "cached_tokens_p50": statistics.median(hits),
            "first_divergence": [d for d in diverge if d is not None]}


def run_parts(llm: LLM, z: Sizes, parts: set[str], systems: dict) -> dict:
    """Fills `systems` of the results file as the parts finish (a failing part leaves the earlier ones there):
    hybrid (caching on) and, for (c), hybrid_prefix_caching_off."""
    vocab = llm.model_config.vocab_size
    pc: dict = {}
    hybrid: dict = {"prefix_cache": pc}
    systems["hybrid"] = hybrid
    if "a" in parts:
        pc.update(cached_prefix(llm, Ids(vocab, 1), z))
        print(json.dumps({k: pc[k] for k in ("ttft_cached_prefix_ms", "ttft_20_ms", "ttft_50_ms")}), flush=True)
    if "b" in parts:
        one = multi_turn(llm, vocab, z, 1, z.host_profile)
        pc.update({k: one[k] for k in ("multi_turn_ttft_p50_ms", "multi_turn_ttft_p50_ms_off")})
        pc["multi_turn"] = one
        if "ttft_50_ms" in pc:
            pc["multi_turn_worst_over_50"] = one["worst_turn_p50_ms"] / pc["ttft_50_ms"]
            pc["goal_multi_turn_over_50"] = 1.3
        print(json.dumps({"on": one["multi_turn_ttft_p50_ms"], "off": one["multi_turn_ttft_p50_ms_off"],
                          "prefilled": one["prefilled_tokens_per_turn"],
                          "host_on": one.get("host_before_prefill_p50_ms")}), flush=True)
        if z.gap_ab_s:
            z.turn_gap_s = z.gap_ab_s
            gap = pc["multi_turn_gap"] = multi_turn(llm, vocab, z, 1)
            z.turn_gap_s = 0.0
            print(json.dumps({"gap_ms": z.gap_ab_s * 1e3, "on": gap["multi_turn_ttft_p50_ms"]}), flush=True)
        if z.conversations:
            pc["multi_turn_concurrent"] = multi_turn(llm, vocab, z, z.conversations)
    if "c" in parts:
        unique = unique_prompts(llm, Ids(vocab, 2), z)
        hybrid.update(unique["on"])
        systems["hybrid_prefix_caching_off"] = unique["off"]
        pc["unique_prompts"] = {k: unique[k] for k in ("ttft_p50_on_over_off", "tpot_p50_on_over_off",
                                                       "goal_ratio_max")}
        print(json.dumps(pc["unique_prompts"]), flush=True)
    if "d" in parts:
        key = "fp16_agreement" if llm.dtype == torch.float16 else "agreement"
        pc[key] = agreement(llm, vocab, z)
        print(json.dumps({key: pc[key]["agreement"]}), flush=True)
    s = llm.stats()
    pc["stats"] = {k: s[k] for k in ("prefix_cache_hit_tokens", "prefix_cache_hit_rate", "kv_blocks_cached",
                                     "prefix_cache_evictions", "graphs_captured", "graphs_failed", "jit_steps",
                                     "graph_steps")}
    return systems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-2-7b-shape", help="model preset (tiny-llama for a CPU smoke run)")
    ap.add_argument("--small", action="store_true", help="small sizes (default on the CPU)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--parts", default="a,b,c,d", help="which of (a)..(d) to run")
    ap.add_argument("--agreement-model", default=None,
                    help="also run (d) on this model (e.g. a real-weights GGUF: random weights leave near-ties)")
    ap.add_argument("--agreement-dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                    help="dtype of the --agreement-model run (auto: float16 on CUDA, float32 on the CPU)")
    ap.add_argument("--agreement-full", action="store_true",
                    help="the --agreement-model run at the full sizes (64 prompts x 32 tokens) also on the CPU")
    ap.add_argument("--batched-prefill", action="store_true", help="EngineConfig.batched_prefill (the concurrent "
                    "conversations' prompts of one step in one forward pass)")
    ap.add_argument("--max-model-len", type=int, default=None, help="of the --preset engine (default 4096 on a GPU, "
                    "1024 on the CPU)")
    ap.add_argument("--gap-ab-ms", type=float, default=0.0, help="(b) once more with this pause between one turn's "
                    "last token and the next turn (as an agent's tool call), beside the back-to-back run")
    ap.add_argument("--conversations", type=int, default=None, help="(b)'s concurrent run: this many conversations "
                    "at once (default 8, 2 with --small; 0 leaves it out)")
    ap.add_argument("--host-profile", default=None, help="(b): a cProfile of the single conversation's turns, "
                    "from each request to its prefill's staging (caching on), written to this path")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    z = Sizes(args.small or not cuda, args.runs)
    z.gap_ab_s = args.gap_ab_ms / 1e3
    if args.conversations is not None:
        z.conversations = args.conversations
    z.host_profile = args.host_profile
    t_start = time.perf_counter()
    llm = LLM(args.preset, capture="eager", max_model_len=args.max_model_len or (4096 if cuda else 1024),
              batched_prefill=args.batched_prefill)
    res = {"card": card_name(llm.device), **versions(), "model": args.preset, "dtype": str(llm.dtype)[6:],
           "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "created": time.strftime("%Y-%m-%d %H:%M:%S"), "load_s": time.perf_counter() - t_start,
           "batched_prefill": args.batched_prefill}
    res["systems"] = {}
    try:
        run_parts(llm, z, set(args.parts.split(",")), res["systems"])
    except Exception as e:  # noqa: BLE001 - the parts that finished are still written, with what stopped the rest
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        print(f"stopped: {res['error']}", flush=True)
    finally:
        llm.close()
    if args.agreement_model and "error" not in res:
        del llm
        sizes = Sizes(False, args.runs) if args.agreement_full else z
        real = res["systems"]["hybrid"]["prefix_cache"]["agreement_real_model"] = \
            real_model_agreement(args.agreement_model, sizes, args.agreement_dtype)
        print(json.dumps({"real_model_agreement": real["agreement"]}), flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out} in {res['wall_s']:.0f} s", flush=True)
    return 1 if "error" in res else 0


def real_model_agreement(model: str, z: Sizes, dtype: str = "auto") -> dict:
    """(d) on another model, in `dtype` (auto: fp16 on the GPU, as the first model ran, fp32 on the CPU)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if dtype == "auto":
        dtype = "float16" if torch.cuda.is_available() else "float32"
    llm = LLM(model, capture="eager", dtype=dtype)
    try:
        vocab = llm.model_config.vocab_size
        return {"model": model, "dtype": dtype, "device": str(llm.device), **agreement(llm, vocab, z)}
    finally:
        llm.close()


if __name__ == "__main__":
    sys.exit(main())
