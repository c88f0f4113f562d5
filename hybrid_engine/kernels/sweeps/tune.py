"""Run the sweeps for a set of shapes and save each choice into the card's tuning table as it is made.

`tune` measures the one-row GEMVs first (batch 1 decodes through them), then the decode GEMM shapes (the batch-
invariant path, and 2-16 rows), then the prefill projection plan (each projection's fastest choice per prompt
bucket), then the cached-prefill attention's token counts, within one time budget shared in
the proportions of SHARES: a shape or token count still being measured when the budget runs
out is left unsaved, and everything finished before it stays saved. The benches that time a config are parameters,
so the orchestration runs without CUDA in tests.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from .. import gemv, tuning
from .cached_attention_sweep import STARTS, TOKENS, AttentionBench, AttentionShape, Sweep, recommend, sweep_tokens
from .decode_gemm_sweep import RULE_MS, GemmBench, GemmShape, ShapeBench, chosen_us, sweep_shape
from .gemv_sweep import GemvBench, GpuGemvBench, kind_of, sweep_gemv, sweep_gemv_norm
from .prefill_gemm_sweep import MS as PREFILL_MS
from .prefill_gemm_sweep import GpuPrefillGemmBench, PrefillGemmBench, choice_at, plan_from
from .prefill_gemm_sweep import sweep_shape as sweep_prefill

logger = logging.getLogger(__name__)

KERNELS = ("gemv", "decode_gemm", "prefill_gemm", "cached_attention")  # what `tune` can measure, in that order
SHARES = {"gemv": 1.0, "decode_gemm": 4.0, "prefill_gemm": 0.5, "cached_attention": 8 / 3}  # of the budget
PREFILL_PROJECTIONS = ("qkv", "o", "gate_up", "down")  # a prefill's LM head sees one row: the GEMV's
TRANSPOSED_COPY = ("qkv", "gate_up")  # the projections the model keeps a transposed copy of (prefill_weight_copy)


@dataclass(frozen=True, slots=True)
class TuneShapes:
    """What to measure for one model on one rank: its decode projections, its attention heads and its dtype."""

    gemm: tuple[GemmShape, ...]
    attention: AttentionShape
    dtype: torch.dtype


@dataclass(slots=True)
class TuneRow:
    """One table entry: `config` None where nothing was chosen (`note` says why). `us` and `baseline_us` are by M
    (decode GEMM, baseline cuBLAS) or by cached start (attention, baseline the config used before)."""

    family: str
    label: str
    key: str
    config: tuple[int, ...] | None
    us: dict[int, float] = field(default_factory=dict)
    baseline_us: dict[int, float] = field(default_factory=dict)
    note: str = ""


class Progress(Protocol):
    """The part of a tqdm bar `tune` uses."""

    def set_description(self, desc: str) -> None: ...

    def update(self, n: int = 1) -> None: ...


@dataclass(slots=True)
class TuneRun:
    """How `tune` measures and where it saves. `gemm_bench` / `attention_bench` make the benches (default: the GPU
    ones); `workers` compile processes for the decode GEMM (0: compile in this process)."""

    device_name: str
    budget_s: float = 300.0
    quick: bool = False
    out: Path | None = None
    sms: int = 132
    workers: int = 0
    progress: Progress | None = None
    gemm_bench: Callable[[GemmShape, torch.dtype, float], GemmBench] | None = None
    gemv_bench: Callable[[GemmShape, torch.dtype, float], GemvBench] | None = None
    attention_bench: Callable[[AttentionShape, torch.dtype, float], AttentionBench] | None = None
    prefill_bench: Callable[[GemmShape, torch.dtype, float], PrefillGemmBench] | None = None
    saved_to: Path | None = None


def steps(shapes: TuneShapes, kernels: tuple[str, ...]) -> int:
    """How many units (decode GEMM shapes, GEMV shapes and their norm-folded variants, attention token counts)
    `tune` goes through: a progress bar's total."""
    folded = sum(kind_of(shape) in gemv.NORM_FAMILIES for shape in shapes.gemm)
    return (len(shapes.gemm) * ("decode_gemm" in kernels) + (len(shapes.gemm) + folded) * ("gemv" in kernels)
            + len(_prefill_shapes(shapes)) * ("prefill_gemm" in kernels)
            + len(TOKENS) * ("cached_attention" in kernels))


def _prefill_shapes(shapes: TuneShapes) -> tuple[GemmShape, ...]:
    return tuple(s for s in shapes.gemm if s.name in PREFILL_PROJECTIONS)


def tune(shapes: TuneShapes, kernels: tuple[str, ...], run: TuneRun) -> list[TuneRow]:
    """Measure `kernels` (a subset of KERNELS) for `shapes` on this card within `run.budget_s` seconds, saving each
    choice through `tuning.save` (to `run.out`, else the user cache; `run.saved_to` tells where) as it is made."""
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown or not kernels:
        raise ValueError(f"kernels={list(kernels)!r}: choose one or more of {list(KERNELS)}")
    t0 = time.monotonic()
    total = sum(SHARES[k] for k in kernels)
    ends, spent = {}, 0.0
    for k in KERNELS:  # each family's deadline: its share of the budget after the families before it
        if k in kernels:
            spent += SHARES[k] / total
            ends[k] = t0 + spent * run.budget_s
    rows: list[TuneRow] = []
    if "gemv" in kernels:
        rows += _tune_gemv(shapes, run, ends["gemv"])
    if "decode_gemm" in kernels:
        rows += _tune_gemm(shapes, run, ends["decode_gemm"])
    if "prefill_gemm" in kernels:
        rows += _tune_prefill(shapes, run, ends["prefill_gemm"])
    if "cached_attention" in kernels:
        rows += _tune_attention(shapes, run, ends["cached_attention"] - time.monotonic())
    return rows


def _save(run: TuneRun, family: str, key: str, config: tuple[int, ...]) -> None:
    run.saved_to = tuning.save(family, {key: config}, run.device_name, run.out)


def _step(run: TuneRun, label: str) -> None:
    if run.progress is not None:
        run.progress.set_description(label)


def _done(run: TuneRun) -> None:
    if run.progress is not None:
        run.progress.update(1)


def _compile_pool(workers: int) -> Executor | None:
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 0 else None


def default_workers() -> int:
    """Compile processes for the decode GEMM sweep: half the cores, at most 8."""
    return min(8, max(1, (os.cpu_count() or 2) // 2))


def _tune_gemv(shapes: TuneShapes, run: TuneRun, deadline: float) -> list[TuneRow]:
    make = run.gemv_bench or (lambda shape, dtype, until: GpuGemvBench(shape, dtype, "cuda", until))
    rows = []
    for shape in shapes.gemm:
        kind = kind_of(shape)
        key = tuning.shape_key(shape.n, shape.k, dtype=shapes.dtype)
        row = TuneRow(gemv.FAMILIES[kind], shape.label, key, None)
        _step(run, f"{row.family} {shape.label}")
        bench = None
        if time.monotonic() >= deadline:
            row.note = "time limit reached before it started"
        else:
            bench = make(shape, shapes.dtype, deadline)
            before = gemv.config_for(kind, shape.n, shape.k, torch.device("cuda"), shapes.dtype)
            _record(run, row, bench, sweep_gemv(bench, before), "cuBLAS is faster")
            gemv.config_for.cache_clear()  # this process's later lookups see the entry
        rows.append(row)
        _done(run)
        if kind in gemv.NORM_FAMILIES:  # the same kernel with the RMSNorm before it folded in, vs the norm apart
            folded = TuneRow(gemv.NORM_FAMILIES[kind], shape.label, key, None)
            _step(run, f"{folded.family} {shape.label}")
            if bench is None or time.monotonic() >= deadline:
                folded.note = "time limit reached before it started"
            else:
                apart = row.config or gemv.config_for(kind, shape.n, shape.k, torch.device("cuda"), shapes.dtype)
                _record(run, folded, bench, sweep_gemv_norm(bench, apart), "the norm apart is faster")
                gemv.norm_config_for.cache_clear()
            rows.append(folded)
            _done(run)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _record(run: TuneRun, row: TuneRow, bench: GemvBench, result: dict, empty_means: str) -> None:
    """Fill `row` from a GEMV sweep's result and save its choice (an empty entry: `empty_means`), unless the sweep
    was cut short or nothing worked."""
    row.baseline_us = {1: result["baseline_us"]} if result["baseline_us"] is not None else {}
    if bench.skipped:
        row.note = f"time limit reached: {bench.skipped} measurements skipped, not saved"
    elif result["chosen"] is None:
        row.note = f"no config worked ({len(bench.failed)} failed)"
    else:
        row.config, row.us = result["chosen"], {1: result["us"]}
        if not row.config:
            row.note = f"{empty_means}: saved as an empty entry"
        _save(run, row.family, row.key, row.config)


def _tune_gemm(shapes: TuneShapes, run: TuneRun, deadline: float) -> list[TuneRow]:
    make = run.gemm_bench or (lambda shape, dtype, until: ShapeBench(shape, dtype, "cuda", until))
    dtype_name = str(shapes.dtype).removeprefix("torch.")
    rows, pool = [], _compile_pool(run.workers)
    try:
        for shape in shapes.gemm:
            _step(run, f"decode_gemm {shape.label}")
            if time.monotonic() < deadline:
                rows.append(_gemm_row(make(shape, shapes.dtype, deadline), pool, run, dtype_name))
            else:  # not even its weights are made: the budget is spent
                rows.append(TuneRow("decode_gemm", shape.label,
                                    tuning.shape_key(shape.n, shape.k, dtype=dtype_name), None,
                                    note="time limit reached before it started"))
            _done(run)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the next shape's weight copies need the room
    finally:
        if pool is not None:
            pool.shutdown()
    return rows


def _gemm_row(bench: GemmBench, pool: Executor | None, run: TuneRun, dtype_name: str) -> TuneRow:
    s = bench.shape
    row = TuneRow("decode_gemm", s.label, tuning.shape_key(s.n, s.k, dtype=dtype_name), None)
    result = sweep_shape(bench, pool, run.quick, run.sms, dtype_name)
    row.baseline_us = {m: us for m, us in bench.times.get("cublas", {}).get("F.linear", {}).items() if m in RULE_MS}
    if bench.skipped:
        row.note = f"time limit reached: {bench.skipped} measurements skipped, not saved"
    elif result is None:
        row.note = f"no config worked ({len(bench.failed)} failed)"
    else:
        row.config, row.us = tuple(result["chosen"]), {m: chosen_us(bench, result)[m] for m in RULE_MS}
        _save(run, "decode_gemm", row.key, row.config)
    return row


def _tune_prefill(shapes: TuneShapes, run: TuneRun, deadline: float) -> list[TuneRow]:
    """The prefill plan of each projection: every choice timed per prompt bucket (PREFILL_MS), the plan saved
    unless the time limit cut its shape short."""
    def gpu(shape: GemmShape, dtype: torch.dtype, until: float) -> PrefillGemmBench:
        return GpuPrefillGemmBench(shape.n, shape.k, shape.name in TRANSPOSED_COPY, dtype, until)

    make = run.prefill_bench or gpu
    rows = []
    for shape in _prefill_shapes(shapes):
        row = TuneRow("prefill_gemm", shape.label, tuning.shape_key(shape.n, shape.k, dtype=shapes.dtype), None)
        _step(run, f"prefill_gemm {shape.label}")
        if time.monotonic() >= deadline:
            row.note = "time limit reached before it started"
        else:
            bench = make(shape, shapes.dtype, deadline)
            times = sweep_prefill(bench, PREFILL_MS, shape.name in TRANSPOSED_COPY)
            plan = plan_from(times)
            row.baseline_us = {m: t["cublas"] for m, t in times.items() if "cublas" in t}
            row.us = {m: times[m][c] for m in row.baseline_us if (c := choice_at(plan, m)) in times[m]}
            if bench.skipped:
                row.note = f"time limit reached: {bench.skipped} measurements skipped, not saved"
            elif not row.baseline_us:
                row.note = f"cuBLAS could not be timed ({len(bench.failed)} failed)"
            else:
                row.config = tuple((m, tuple(c) if isinstance(c, list) else c) for m, c in plan)
                if not plan:
                    row.note = "cuBLAS is fastest at every length: saved as an empty plan"
                _save(run, "prefill_gemm", row.key, plan)
        rows.append(row)
        _done(run)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _tune_attention(shapes: TuneShapes, run: TuneRun, budget_s: float) -> list[TuneRow]:
    a = shapes.attention
    make = run.attention_bench or (lambda shape, dtype, budget: Sweep(shape, budget, dtype))
    bench, rows = make(a, shapes.dtype, max(0.0, budget_s)), []
    for tokens in TOKENS:
        _step(run, f"cached_attention T={tokens} {a.num_heads}x{a.head_dim}")
        skipped = bench.skipped
        times, fixed = sweep_tokens(bench, tokens, list(STARTS))
        rows.append(_attention_row(run, shapes, tokens, times, fixed, bench.skipped - skipped))
        _done(run)
    return rows


def _attention_row(run: TuneRun, shapes: TuneShapes, tokens: int, times: dict, fixed: dict,
                   skipped: int) -> TuneRow:
    a = shapes.attention
    key = tuning.shape_key(tokens, a.num_heads, a.head_dim, dtype=shapes.dtype)
    row = TuneRow("cached_attention", f"T={tokens} heads {a.num_heads}x{a.head_dim}", key, None)
    config, _ = recommend(times)
    before = fixed.get("cached_config")
    row.baseline_us = {s: per[before] for s, per in times.items() if before in per}
    if config is None:
        row.note = f"time limit reached: {skipped} measurements skipped" if skipped else "no config worked"
        return row
    row.config, row.us = tuple(config), {s: per[config] for s, per in times.items()}
    if skipped:  # the config used before is measured first, so what was measured still beats or equals it
        row.note = f"{skipped} measurements skipped (time limit); chosen among those measured"
    _save(run, "cached_attention", key, row.config)
    return row
