"""One system's measurements (their definitions are the docstrings below): first request, TTFT p50/p99 per prompt length with and
without tokenization, TPOT both ways, graph memory. Fresh random prompt ids every run; lengths interleaved."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(slots=True)
class Plan:
    lengths: list[int]
    runs: int = 30
    gen_tokens: int = 128
    tpot_runs: int = 30
    stream_runs: int = 1  # streamed requests per prompt length (each gives gen_tokens - 1 step samples)
    tpot_prompt_len: int = 100
    warmup: int = 2
    settle_s: float = 120.0

    def requests(self) -> int:
        per_len = self.warmup + 1 + 2 * self.runs
        return 1 + len(self.lengths) * (per_len + self.stream_runs) + 2 + self.tpot_runs


def summary(seconds: list[float]) -> dict[str, float]:
    """p50 / p99 / mean / min in ms over the samples (numpy's linear-interpolated percentiles)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"p50": math.nan, "p99": math.nan, "mean": math.nan, "min": math.nan, "n": 0}
    return {"p50": round(float(np.percentile(ms, 50)), 4), "p99": round(float(np.percentile(ms, 99)), 4),
            "mean": round(float(ms.mean()), 4), "min": round(float(ms.min()), 4), "n": int(ms.size)}


class Prompts:
    """Fresh random prompt ids drawn from the tokenizer's ordinary (non-special) ids, and text prompts of about
    the same token count (decode, re-encode, trim: a text prompt's exact length depends on the tokenizer)."""

    def __init__(self, tokenizer: Any, vocab_size: int, seed: int) -> None:
        self.tokenizer = tokenizer
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        limit = min(vocab_size, len(tokenizer))
        self.ids = np.array([i for i in range(limit) if i not in special], dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def ids_of(self, n: int) -> list[int]:
        return self.rng.choice(self.ids, size=n).tolist()

    def text_of(self, n: int) -> tuple[str, int]:
        """A text of about n tokens (specials included) and its exact token count."""
        tok = self.tokenizer
        added = len(tok("").input_ids)  # BOS and the like
        text = tok.decode(self.ids_of(max(1, n - added)), skip_special_tokens=True)
        for _ in range(3):
            body = tok(text, add_special_tokens=False).input_ids
            if len(body) + added <= n:
                break
            text = tok.decode(body[: max(1, n - added)])
        return text, len(tok(text).input_ids)


def measure_system(system: Any, plan: Plan, prompts: Prompts, tick: Callable[[int], None],
                   checkpoint: Callable[[dict], None]) -> dict[str, Any]:
    """Run every measurement of one system; `checkpoint` receives the partial result after each phase."""
    res: dict[str, Any] = {}
    ttft, e2e_first = _first_request(system, plan, prompts)
    res.update(first_request_ttft_ms=round(ttft * 1e3, 3), first_request_e2e_ms=round(e2e_first * 1e3, 3))
    tick(1)
    checkpoint(res)
    _warm_up(system, plan, prompts, tick)
    res["after_warmup_stats"] = _jsonable(system.settle(plan.settle_s))
    checkpoint(res)
    res.update(_ttft(system, plan, prompts, tick))
    checkpoint(res)
    res.update(_tpot_end_to_end(system, plan, prompts, res["ttft_ms"], tick))
    checkpoint(res)
    res.update(_tpot_streamed(system, plan, prompts, tick))
    if getattr(system, "device_type", None) == "cuda" and hasattr(system, "step_profile"):
        try:
            res.update(system.step_profile(prompts.ids_of(plan.tpot_prompt_len)))
        except Exception as exc:  # noqa: BLE001 - a profiler problem must not lose the latency results
            res["step_profile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    stats = _jsonable(system.stats())
    if "graph_pool_bytes" in stats:
        res["graph_pool_bytes"] = int(stats["graph_pool_bytes"] or 0)
    if stats:
        res["stats"] = stats
    checkpoint(res)
    return res


def _first_request(system: Any, plan: Plan, prompts: Prompts) -> tuple[float, float]:
    ttft, _, e2e = system.stream(prompts.ids_of(plan.tpot_prompt_len), plan.gen_tokens)
    return ttft, e2e


def _warm_up(system: Any, plan: Plan, prompts: Prompts, tick: Callable[[int], None]) -> None:
    for n in sorted(plan.lengths, reverse=True):  # longest first: a static cache is sized once
        for _ in range(plan.warmup):
            system.ttft_ids(prompts.ids_of(n))
        system.ttft_text(prompts.text_of(n)[0])
        tick(plan.warmup + 1)
    system.generate_e2e(prompts.ids_of(plan.tpot_prompt_len), plan.gen_tokens)
    system.stream(prompts.ids_of(plan.tpot_prompt_len), plan.gen_tokens)
    tick(2)


def _ttft(system: Any, plan: Plan, prompts: Prompts, tick: Callable[[int], None]) -> dict[str, Any]:
    raw: dict[int, list[float]] = {n: [] for n in plan.lengths}
    text: dict[int, list[float]] = {n: [] for n in plan.lengths}
    text_tokens: dict[int, list[int]] = {n: [] for n in plan.lengths}
    engine: dict[int, list[float]] = {n: [] for n in plan.lengths}
    for _ in range(plan.runs):
        for n in prompts.rng.permutation(plan.lengths).tolist():  # interleaved: drift hits every length alike
            raw[n].append(system.ttft_ids(prompts.ids_of(n)))
            engine[n].append(system.last_engine_ttft_s)
            prompt, count = prompts.text_of(n)
            text[n].append(system.ttft_text(prompt))
            text_tokens[n].append(count)
            tick(2)
    out: dict[str, Any] = {
        "ttft_ms": {str(n): summary(raw[n]) for n in plan.lengths},
        "ttft_text_ms": {str(n): {**summary(text[n]), "prompt_tokens_mean": float(np.mean(text_tokens[n]))}
                         for n in plan.lengths},
    }
    if not any(math.isnan(x) for xs in engine.values() for x in xs):
        out["engine_ttft_ms"] = {str(n): summary(engine[n]) for n in plan.lengths}
    return out


def _tpot_end_to_end(system: Any, plan: Plan, prompts: Prompts, ttft_ms: dict[str, Any],
                     tick: Callable[[int], None]) -> dict[str, Any]:
    """Way (a): end-to-end of gen_tokens minus the TTFT p50 at that length, / (gen_tokens - 1)."""
    n, steps = plan.tpot_prompt_len, plan.gen_tokens - 1
    if str(n) in ttft_ms:
        base_s = ttft_ms[str(n)]["p50"] / 1e3
    else:
        base_s = float(np.median([system.ttft_ids(prompts.ids_of(n)) for _ in range(plan.runs)]))
    e2e = []
    for _ in range(plan.tpot_runs):
        e2e.append(system.generate_e2e(prompts.ids_of(n), plan.gen_tokens))
        tick(1)
    return {"tpot_ms": summary([(t - base_s) / steps for t in e2e]), "e2e_ms": summary(e2e),
            "tpot_prompt_len": n, "gen_tokens": plan.gen_tokens}


def _tpot_streamed(system: Any, plan: Plan, prompts: Prompts, tick: Callable[[int], None]) -> dict[str, Any]:
    """Way (b): every streamed step's host-observed gap, at every prompt length."""
    gaps: dict[int, list[float]] = {m: [] for m in plan.lengths}
    for _ in range(plan.stream_runs):
        for m in prompts.rng.permutation(plan.lengths).tolist():
            gaps[m].extend(system.stream(prompts.ids_of(m), plan.gen_tokens)[1])
            tick(1)
    by_len = {str(m): summary(gaps[m]) for m in plan.lengths}
    n = plan.tpot_prompt_len
    return {"tpot_streamed_ms": by_len.get(str(n)) or summary([g for v in gaps.values() for g in v]),
            "tpot_streamed_by_len_ms": by_len}


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in stats.items()}
