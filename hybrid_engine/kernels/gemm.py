"""Projections for a prefill step (M = 16..512 rows): a Triton GEMM over nn.Linear weights [N, K], fp32 accumulation.

`gemm_triton(x, weight, bias, config)` computes x [M, K] @ weight[N, K].T (+ bias). Inside `graph_plan()` (graph
captures), `linear` (gemv.py) follows the projection plan per weight shape and row count (`config_for`): this
kernel, cuBLASLt (`linear_lt`), cuBLAS on the weight's transposed copy, the decode GEMM or cuBLAS (F.linear),
whichever measured fastest. The plan is the card's own where its tuning table has the shape (family "prefill_gemm",
written by kernels/sweeps/prefill_gemm_sweep.py through `hybrid-engine tune` or benchmarks/prefill_gemm_bench.py),
else the built-in tables below, measured on the H100. The JIT path takes cuBLAS (or cuBLAS on the copy).

At prefill lengths of a few hundred tokens a LLaMA-7B step is bound by the weight read and the tensor cores about
equally (arithmetic intensity M flop per weight byte; the H100 ridge is ~300), so the tile order matters: the
programs that share one weight tile (all M tiles of one N column) are adjacent in launch order, so the weight is
read from HBM once and the other M tiles hit L2. Rows past M are clamped to row M-1 on load (no masks in the
inner loop) and masked on store. Output allocated like F.linear; no workspace, no host sync: CUDA-graph capturable.
"""
from __future__ import annotations

import functools
import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .._local import local_setting
from . import tuning
from ._triton import cdiv, env_choice, launch, pdl_enter

logger = logging.getLogger(__name__)

tl = None  # triton.language, bound on first launch (see _triton.py)

# The built-in prefill projection plan (for cards and shapes without a tuned one, `tuned_plan`): (N, K) ->
# [(max_M, choice), ...] sorted by max_M; the first entry with M <= max_M applies. choice: None = cuBLAS through
# F.linear; "lt" = cuBLASLt through F.linear with a zero bias (torch routes a biased fp16 linear to cublasLt, whose
# kernel choice differs: it avoids cuBLAS's slow picks at some M); a tuple =
# this Triton GEMM with (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). M above the last entry, or a shape not
# listed: cuBLAS. Measured on the H100 80GB HBM3 (fp16, weights rotated past L2, CUDA-graph replay), best of
# cuBLAS / cuBLASLt / Triton per bucket, a non-default choice only where >= 2% faster: `benchmarks/gemm_bench.py
# --cublas-variants`, benchmarks/results/nvidia-h100-80gb-hbm3-llama-2-7b-shape-2026-11-26-gemm-variants.json.
# Comments: us, cuBLAS -> choice.
GEMM_CONFIGS: dict[tuple[int, int], list[tuple[int, tuple[int, int, int, int, int] | str | None]]] = {
    (12288, 4096): [(16, None), (32, (32, 128, 128, 4, 4)), (240, None), (256, "lt")],  # QKV M=32 40.3->38.0
    (4096, 4096): [(16, (16, 64, 128, 4, 4))],                                          # O M=16 17.7->16.6
    (22016, 4096): [(16, (16, 64, 128, 4, 4)), (48, None), (64, (64, 64, 128, 4, 4)),   # gate/up M=64 71.6->67.8,
                    (224, None), (240, "lt"), (320, None), (384, "lt")],                # M=240 104->79
    (4096, 11008): [(64, None), (112, "lt"), (128, None), (192, "lt"), (200, None),      # down M=192 53.9->45.0,
                    (240, "lt"), (256, None), (288, "lt"), (320, None), (384, "lt")],   # 208 49.7->47.1, 224 58.7->50.3
}
# The plan over a projection's transposed copy (`weight_t`, W^T [K, N] contiguous: LlamaModel's prefill weight copy,
# made for QKV and gate/up), consulted first when the copy exists: "t" = cuBLAS on it (its NN kernels), "t_lt" = the
# same through cuBLASLt, None = the GEMM_CONFIGS plan on the weight itself. Measured like GEMM_CONFIGS (H100, two
# runs; benchmarks/results/nvidia-h100-80gb-hbm3-llama-2-7b-shape-2026-11-26-gemm-{nn,xt}.json, `nn` / `nn_lt`
# columns): NN is 4-9% faster than the weight's best entry at 16-288 rows for QKV, and for gate/up except at 192,
# 224 and 256 rows.
# Comments: us, weight's best -> copy (run 1).
GEMM_T_CONFIGS: dict[tuple[int, int], list[tuple[int, str | None]]] = {
    (12288, 4096): [(288, "t")],                                                  # QKV M=208 42.8->39.7
    (22016, 4096): [(176, "t"), (192, None), (208, "t"), (224, None),             # gate/up M=208 75.2->70.3,
                    (240, "t_lt"), (256, None), (288, "t")],                      # M=240 78.6->74.0
}
DEFAULT_CONFIG = (64, 64, 64, 4, 3)  # what tests and gemm_triton use when no config is given


def _gemm_kernel(A, W, B, C, M, N, K, stride_am, stride_wn, stride_cm, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
                 EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m  # M tiles fastest: the programs reading one weight tile run side by side
    pid_n = pid // num_pid_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_rows = tl.minimum(rows, M - 1).to(tl.int64)  # clamp: padding rows re-read row M-1, never stored
    w_rows = cols.to(tl.int64)
    if not EVEN_N:
        w_rows = tl.minimum(cols, N - 1).to(tl.int64)
    a_ptrs = A + a_rows[:, None] * stride_am + ks[None, :]
    w_ptrs = W + w_rows[:, None] * stride_wn + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            kmask = (k0 + ks) < K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(B + tl.minimum(cols, N - 1)).to(tl.float32)[None, :]
    c_ptrs = C + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def gemm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int, int] | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias) -> [..., N] in x's dtype (or out_dtype: the float32 sum unrounded).
    weight's rows must be contiguous."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns but weight has K={k}")
    block_m, block_n, block_k, num_warps, num_stages = config or DEFAULT_CONFIG
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out.view(*lead, n)
    grid = (cdiv(m, block_m) * cdiv(n, block_n),)
    launch(_gemm_kernel, grid,
        x2, weight, bias if bias is not None else weight, out, m, n, k, x2.stride(0), weight.stride(0),
        out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (tf32 only applies to it)
        num_warps=num_warps, num_stages=num_stages)
    return out.view(*lead, n)


_PLAN = threading.local()


def in_graph_plan() -> bool:
    """Whether this thread is inside `graph_plan()` (a graph capture or its warm-up) rather than on the JIT path."""
    return bool(getattr(_PLAN, "on", False))


@contextmanager
def graph_plan() -> Iterator[None]:
    """Within this block (on this thread), `config_for` follows the plan. Outside it, every multi-row product goes
    to cuBLAS: the plan's choices were measured as GPU time in graph replays, while the JIT path is bound by host
    time, and there the Triton GEMM did not pay (H100, 100 tokens, Triton GEMM up to M=128 with the launch cache:
    JIT prefill 13.6 vs 12.7 ms with cuBLAS, benchmarks/NOTES.md, 2026-11-26 21:47). Graph captures and their
    warm-ups run inside it; thread-local, so a capture on the worker thread does not change what the serving thread
    runs."""
    with local_setting(_PLAN, "on", True):
        yield


def warm_up_lengths(device: torch.device | None = None) -> set[int]:
    """Row counts that compile every Triton config (and the decode GEMM) of the plan in both of Triton's integer
    specialisations of M (a multiple of 16 or not) and make every zero bias of the "lt" / "t_lt" entries, so that
    a request never compiles a GEMM variant or allocates a bias (run at load before any graph capture when Triton's
    cache is empty; with a warm cache each capture's own warm-up run, before the capture begins, does the same for
    its step). `device`: its card's tuned plans count too."""
    plans = [*GEMM_CONFIGS.values(), *GEMM_T_CONFIGS.values()]
    if device is not None and device.type == "cuda" and use_tuned_plans():
        for key, raw in tuning.entries("prefill_gemm", device).items():
            try:
                plans.append(_plan_entries(raw, f"prefill_gemm {key}"))
            except ValueError:
                continue  # tuned_plan logs it when a lookup meets it
    out = set()
    for entries in plans:
        low = 1
        for max_m, cfg in entries:
            if isinstance(cfg, tuple) or cfg == "decode_gemm":
                out.update(m for m in (max_m - 1, max_m) if m > max(low, 1))
            elif cfg in ("lt", "t_lt"):  # makes the zero bias before any capture
                out.add(max_m)
            low = max_m
    return out


def config_for(m: int, n: int, k: int, transposed: bool = False, device: torch.device | None = None,
               dtype: torch.dtype = torch.float16) -> tuple[int, int, int, int, int] | str | None:
    """The plan's choice for an [m, k] x [n, k]^T product: a Triton config, "lt" (cuBLASLt), None (cuBLAS),
    "decode_gemm" (the decode GEMM), with `transposed` (the weight has a transposed copy) "t" / "t_lt" (cuBLAS /
    cuBLASLt on the copy). The plan is the card's measured one where its tuning table has this shape and dtype
    (`tuned_plan`), else the built-in GEMM_T_CONFIGS / GEMM_CONFIGS (measured on the H100), whose unlisted shapes
    of 2..SMALL_PREFILL_MAX_ROWS rows go to the decode GEMM under `small_prefill_mode()` "decode_gemm". Outside
    `graph_plan()` only "t" (its host cost is F.linear's) or None."""
    plan = in_graph_plan()
    if not plan and not transposed:  # the JIT path's usual case, first: its host time counts
        return None
    tuned = tuned_plan(n, k, device, dtype) if device is not None else None
    if tuned is not None:
        choice = next((cfg for max_m, cfg in tuned if m <= max_m), None)
        if choice in ("t", "t_lt") and not transposed:  # the same cuBLAS door on the weight itself
            choice = None if choice == "t" else "lt"
        return choice if plan or choice == "t" else None
    if transposed:
        choice = next((cfg for max_m, cfg in GEMM_T_CONFIGS.get((n, k), ()) if m <= max_m), None)
        if choice == "t" or (choice is not None and plan):
            return choice
    if not plan:
        return None
    if (n, k) not in GEMM_CONFIGS and m <= SMALL_PREFILL_MAX_ROWS and small_prefill_mode() == "decode_gemm":
        return "decode_gemm"
    return next((cfg for max_m, cfg in GEMM_CONFIGS.get((n, k), ()) if m <= max_m), None)


PLAN_CHOICES = ("cublas", "lt", "t", "t_lt", "decode_gemm")


def _plan_entries(raw: Any, where: str) -> tuple[tuple[int, tuple[int, ...] | str | None], ...]:
    """A tuning table's plan [[max_M, choice], ...] as config_for's ranges ("cublas" -> None, lists -> tuples);
    ValueError naming `where` and the bad entry."""
    out = []
    for entry in raw:
        ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], int)
        choice = entry[1] if ok else None
        if ok and isinstance(choice, (list, tuple)):
            ok = len(choice) == 5 and all(isinstance(v, int) and v > 0 for v in choice)
            choice = tuple(choice)
        elif ok:  # the decode GEMM's split-K workspace holds SMALL_PREFILL_MAX_ROWS rows
            ok = choice in PLAN_CHOICES and (choice != "decode_gemm" or entry[0] <= SMALL_PREFILL_MAX_ROWS)
        if not ok or (out and entry[0] <= out[-1][0]):
            raise ValueError(f"{where}: entry {entry!r} must be [max_M, choice] with max_M increasing and choice one "
                             f"of {list(PLAN_CHOICES)} (decode_gemm up to {SMALL_PREFILL_MAX_ROWS} rows) or a 5-int "
                             "Triton config")
        out.append((entry[0], None if choice == "cublas" else choice))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def use_tuned_plans() -> bool:
    """$HYBRID_ENGINE_PREFILL_PLAN (read once per process): "tuned" (default) follows the card's measured plan where
    its tuning table has one; "builtin" always the built-in (H100-measured) tables: an A/B switch."""
    return env_choice("HYBRID_ENGINE_PREFILL_PLAN", "tuned", {"tuned": True, "builtin": False}, "'tuned' or 'builtin'")


@functools.lru_cache(maxsize=None)
def tuned_plan(n: int, k: int, device: torch.device | None,
               dtype: torch.dtype) -> tuple[tuple[int, tuple[int, ...] | str | None], ...] | None:
    """This card's measured prefill plan for an (N, K) weight in `dtype` (family "prefill_gemm" of its tuning table,
    kernels/sweeps/prefill_gemm_sweep.py), or None where it has none (CPU, untuned card or shape). A malformed entry
    is logged and ignored."""
    if device is None or device.type != "cuda" or not use_tuned_plans():
        return None
    key = tuning.shape_key(n, k, dtype=dtype)
    raw = tuning.lookup("prefill_gemm", key, device)
    if raw is None:
        return None
    try:
        return _plan_entries(raw, f"prefill_gemm {key}")
    except ValueError as exc:
        logger.warning("tuning entry ignored: %s", exc)
        return None


SMALL_PREFILL_MAX_ROWS = 32  # the decode GEMM's largest bucket


@functools.lru_cache(maxsize=None)
def small_prefill_mode() -> str:
    """$HYBRID_ENGINE_SMALL_PREFILL (read once per process): "plan" (default) sends the graph-captured products of
    2..SMALL_PREFILL_MAX_ROWS rows whose shape the plan does not list to cuBLAS; "decode_gemm" sends them to the
    Triton decode GEMM (kernels/decode_gemm.py), which takes part in programmatic dependent launch where cuBLAS does
    not. An A/B switch for the small shapes' prefill (their steps are launch-bound), not yet measured on a card."""
    return env_choice("HYBRID_ENGINE_SMALL_PREFILL", "plan", {"plan": "plan", "decode_gemm": "decode_gemm"},
                      "'plan' or 'decode_gemm'")


def reads_copy(rows: int, weight: torch.Tensor, weight_t: torch.Tensor | None) -> bool:
    """Whether a `rows`-row product with `weight` reads its transposed copy `weight_t` (the plan's "t" / "t_lt";
    one row never does: the GEMV reads the weight)."""
    return (weight_t is not None and rows > 1
            and config_for(rows, *weight.shape, transposed=True, device=weight.device,
                           dtype=weight.dtype) in ("t", "t_lt"))


def linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 weight_t: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`KernelOps.linear` of the torch backend: F.linear, on the transposed copy (cuBLAS's NN product on CUDA)
    where the plan picks it (`reads_copy`). out_dtype (float32): the sum not rounded to x's dtype (`linear_wide`)."""
    if out_dtype is not None and out_dtype != x.dtype:
        return linear_wide(x, weight, bias, out_dtype)
    if reads_copy(x.numel() // max(x.shape[-1], 1), weight, weight_t):
        return F.linear(x, weight_t.t(), bias)
    return F.linear(x, weight, bias)


_MM_OUT_DTYPE: bool | None = None  # whether torch.mm takes out_dtype here (found on first use)


def linear_wide(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """F.linear of 16-bit x and weight with its float32 sum returned in `out_dtype` instead of rounded to x's dtype
    (a tensor-parallel rank's row-parallel partial, summed over the ranks before the one rounding). On CUDA cuBLAS
    writes the float32 result of its float16 product (torch.mm's out_dtype); elsewhere the product is taken in
    float32 (a product of two 16-bit values is exact in float32)."""
    global _MM_OUT_DTYPE
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    out = None
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and out_dtype == torch.float32:
        if _MM_OUT_DTYPE is not False:
            try:
                out = torch.mm(x2, weight.t(), out_dtype=out_dtype)
                _MM_OUT_DTYPE = True
            except (RuntimeError, TypeError):  # torch.mm without out_dtype (TypeError) or without a kernel for
                _MM_OUT_DTYPE = False           # it on this card (RuntimeError): the Triton GEMM from now on
        if out is None:
            out = gemm_triton(x2, weight, None, out_dtype=out_dtype)
    else:
        out = F.linear(x2.to(out_dtype), weight.to(out_dtype))
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.view(*lead, weight.shape[0])


_ZERO_BIAS: dict[tuple, torch.Tensor] = {}


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                weight_t: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear one row at a time: a row's result is the same whatever the other rows are (CPU BLAS picks its
    blocking, and so its summation order, by the number of rows). For decode steps on the reference backend.
    out_dtype: as `linear_torch`'s."""
    one: Any = F.linear if out_dtype is None or out_dtype == x.dtype else (
        lambda r, w, b: linear_wide(r, w, b, out_dtype))
    if x.shape[0] <= 1:
        return one(x, weight, bias)
    return torch.cat([one(x[i:i + 1], weight, bias) for i in range(x.shape[0])])


def linear_lt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through cuBLASLt: a biased linear takes torch's cublasLt path, so a missing bias becomes a cached
    zero vector (made once per (N, dtype, device), at warm-up)."""
    if bias is None:
        key = (weight.shape[0], weight.dtype, weight.device)
        bias = _ZERO_BIAS.get(key)
        if bias is None:
            bias = _ZERO_BIAS[key] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return F.linear(x, weight, bias)
