"""Choose the decode GEMM's config per weight shape on the present card (kernels/decode_gemm.py, family
"decode_gemm" of the tuning table, key "N,K,dtype").

Each number is us per call from one CUDA graph of REPS calls, each on its own weight copy (`timing.graph_us`). Every
config is first checked against the fp32 reference and for batch invariance (each of the 32 rows alone equals its
row of the 32-row call, bitwise); a wrong, non-invariant or failing config (too much shared memory) is recorded and
skipped. A config is (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, SWAP); SWAP=1 puts the weight tile in the
dot's M operand (wgmma-sized BLOCK_N, see decode_gemm.py). The search, pruned to a few minutes (compiles can run
first in worker processes, which fill Triton's disk cache):
  1. SWAP=0: (BLOCK_N 16/32/64) x (BLOCK_K 64..512) at num_stages 3; SWAP=1: (BLOCK_N 64/128) x (BLOCK_K 64..256)
     at the most of 4 / 3 / 2 stages that fit; each x (SPLIT_K 1/2/4/8) at num_warps 4, where a split leaves
     >= 2 BLOCK_K steps per split and 1..16 programs per SM at M <= 16 (split 1 always), and the stages' tiles fit
     200 KB of shared memory (`fits_smem`: the rows' tile and the fused variants' two weight tiles);
  2. num_warps 4/8 x num_stages 2..5 for the TOP best of step 1, same SWAP (num_warps 8 only for
     BLOCK_N x BLOCK_K >= 8192, num_stages 4 and 5 only for BLOCK_K <= 256, the tiles fitting);
  3. the fused epilogues for the TOP best plain configs the fused kernel can run (rope + KV store: BLOCK_N divides
     the rotary half head_dim / 2): SiLU-mul on gate/up, rope + KV store on QKV, against the plain decode GEMM +
     silu_mul / rope_store_kv kernels.
Rule: the config with the least `rule_score` (us at M = 1, plus a quarter of each of M = 8 and M = 32: batch-1
latency first, the batch buckets still counted); for QKV and gate/up the score of the fused variant (what the model
runs).
"""
from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from .. import decode_gemm as dg
from .. import gemv
from .timing import REPS, graph_us

logger = logging.getLogger(__name__)

MS = (1, 2, 4, 8, 16, 32)
RULE_MS = (1, 8, 32)  # one of each Triton specialisation of M (== 1, neither, multiple of 16)
RULE_WEIGHTS = {1: 1.0, 8: 0.25, 32: 0.25}
TOP = 3
FUSED_KIND = {"qkv": "rope", "gate_up": "silu"}  # the fused epilogue the model runs on these projections
SMEM_BYTES = 200 * 1024  # of the 227 KB a Hopper program may use
Config = dg.Config


@dataclass(frozen=True, slots=True)
class GemmShape:
    """One decode projection: weight [n, k]; `heads` = (query heads, KV heads, head_dim) for a QKV weight."""

    name: str
    n: int
    k: int
    heads: tuple[int, int, int] | None = None

    @property
    def label(self) -> str:
        return f"{self.name} {self.n}x{self.k}"

    @property
    def fused(self) -> str | None:
        return FUSED_KIND.get(self.name) if self.name != "qkv" or self.heads else None

    def fuses(self, cfg: Config) -> bool:
        """Whether the fused epilogue runs cfg: rope + KV store needs BLOCK_N to divide the rotary half."""
        return self.fused != "rope" or (self.heads[2] // 2) % cfg[0] == 0


class GemmBench(Protocol):
    """What the search needs of a shape's measurements: `ShapeBench` on the GPU, a fake in tests."""

    shape: GemmShape
    times: dict[str, dict[str, dict[int, float]]]  # kind -> str(config) -> M -> us
    failed: dict[str, str]
    skipped: int

    def baselines(self) -> None: ...

    def time(self, kind: str, cfg: Config, ms: tuple[int, ...] = RULE_MS,
             known_bad: dict | None = None) -> float | None: ...


def rule_score(per_m: dict[int, float]) -> float:
    """What the search minimises: RULE_WEIGHTS over the Ms of RULE_MS that were timed."""
    return sum(RULE_WEIGHTS[m] * us for m, us in per_m.items() if m in RULE_WEIGHTS)


def fits_smem(bn: int, bk: int, stages: int) -> bool:
    """Whether `stages` copies of a step's tiles (the rows' [16, BLOCK_K] and two [BLOCK_N, BLOCK_K] weight tiles, as
    in the fused variants; 2-byte elements) fit SMEM_BYTES of shared memory."""
    return (dg.BLOCK_M + 2 * bn) * bk * 2 * stages <= SMEM_BYTES


def stage1_configs(n: int, k: int, quick: bool, sms: int) -> list[Config]:
    tiles = [(0, bn, bk) for bn, bk in itertools.product((16, 32) if quick else (16, 32, 64),
                                                         (128, 256) if quick else (64, 128, 256, 512))]
    tiles += [(1, bn, bk) for bn, bk in itertools.product((64, 128), (128, 256) if quick else (64, 128, 256))]
    out = []
    for (swap, bn, bk), split in itertools.product(tiles, (1, 2, 4, 8)):
        programs = -(-n // bn) * split
        if split > 1 and (k / split < 2 * bk or not sms <= programs <= 16 * sms):
            continue
        stages = next((ns for ns in ((4, 3, 2) if swap else (3,)) if fits_smem(bn, bk, ns)), None)
        if stages is not None:
            out.append((bn, bk, split, 4, stages, swap))
    return out


def stage2_configs(best: list[Config]) -> list[Config]:
    out = []
    for bn, bk, split, _, _, swap in best:
        for nw, ns in itertools.product((4, 8), (2, 3, 4, 5)):
            if (nw == 8 and bn * bk < 8192) or (ns >= 4 and bk > 256) or not fits_smem(bn, bk, ns):
                continue
            if (bn, bk, split, nw, ns, swap) not in best:
                out.append((bn, bk, split, nw, ns, swap))
    return out


# --- Operands and the variants -------------------------------------------------------------------------------------

@dataclass(slots=True)
class RopeOperands:
    cos_sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    heads: tuple[int, int, int]


def rope_operands(heads: tuple[int, int, int] | None, dtype: torch.dtype, device: torch.device) -> RopeOperands:
    """Rotary table and 256 x 16-slot paged caches for a QKV weight of these heads (a token's slot: 200 + row)."""
    hq, hkv, d = heads or (1, 1, 32)
    freqs = torch.outer(torch.arange(4096, dtype=torch.float), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
    kc = torch.zeros(256, 16, hkv, d, device=device, dtype=dtype)
    return RopeOperands(cos_sin, kc, torch.zeros_like(kc), (hq, hkv, d))


def _pos_slots(m: int, first: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and cache slots of rows first..first+m-1 of a batch (a row keeps its own in any subset)."""
    rows = torch.arange(first, first + m, device=device)
    return 100 + rows, 200 + rows


def variant(kind: str, x: torch.Tensor, rope: RopeOperands, m: int, first: int = 0) -> Callable:
    """run(w, cfg) of one variant for the rows x (rows first.. of a batch): "plain", "silu" or "rope" (fused),
    "silu_unfused" and "rope_unfused" (the plain decode GEMM + the silu_mul / rope_store_kv kernel)."""
    from ..activation import silu_mul_triton
    from ..rope import rope_store_kv_triton

    hq, hkv, d = rope.heads
    pos, slots = _pos_slots(m, first, x.device)

    def unfused_rope(w, c):
        qkv = dg.decode_gemm_triton(x, w, None, c).view(m, hq + 2 * hkv, d)
        return rope_store_kv_triton(qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], pos, rope.cos_sin,
                                    rope.k_cache, rope.v_cache, slots)[0]

    return {"plain": lambda w, c: dg.decode_gemm_triton(x, w, None, c),
            "silu": lambda w, c: dg.decode_silu_triton(x, w, c),
            "silu_unfused": lambda w, c: silu_mul_triton(dg.decode_gemm_triton(x, w, None, c)),
            "rope": lambda w, c: dg.decode_rope_store_triton(x, w, None, pos, rope.cos_sin, rope.k_cache,
                                                             rope.v_cache, slots, hq, hkv, c),
            "rope_unfused": unfused_rope}[kind]


def reference(kind: str, x: torch.Tensor, w: torch.Tensor, rope: RopeOperands, m: int) -> torch.Tensor:
    if kind.startswith("silu"):
        return dg.linear_silu_mul_ref(x, w).float()
    if kind.startswith("rope"):
        pos, slots = _pos_slots(m, 0, x.device)
        return dg.linear_rope_store_ref(x, w, None, pos, rope.cos_sin, rope.k_cache.clone(), rope.v_cache.clone(),
                                        slots, rope.heads[0], rope.heads[1]).float()
    return dg.linear_ref(x, w).float()


def check(kind: str, x32: torch.Tensor, w: torch.Tensor, cfg: Config, rope: RopeOperands) -> str | None:
    """None if the variant is right on 32 rows and each row alone equals its row of the 32-row call; else why."""
    out = variant(kind, x32, rope, 32)(w, cfg)
    ref = reference(kind, x32, w, rope, 32)
    err = (out.float() - ref).abs().max().item()
    if not err <= 4e-3 * max(1.0, ref.abs().max().item()):
        return f"wrong: max err {err:.3g}"
    for i in (0, 13, 31):
        if not torch.equal(variant(kind, x32[i:i + 1], rope, 1, first=i)(w, cfg), out[i:i + 1]):
            return f"not batch-invariant: row {i} alone differs"
    return None


# --- Parallel compile (fills Triton's disk cache) -------------------------------------------------------------------

def _compile_job(job: tuple) -> tuple[tuple, str | None]:
    """Worker: run the variant once per Triton specialisation of M on the real shape (compiles and caches)."""
    kind, n, k, cfg, heads, dtype_name = job
    dtype, device = getattr(torch, dtype_name), torch.device("cuda")
    try:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        rope = rope_operands(heads, dtype, device)
        for m in RULE_MS:
            variant(kind, torch.randn(m, k, device=device, dtype=dtype), rope, m)(w, cfg)
        torch.cuda.synchronize()
        return job, None
    except Exception as e:  # noqa: BLE001 - a config may not compile or launch (shared memory, registers)
        return job, f"{type(e).__name__}: {str(e)[:200]}"


def precompile(pool: Executor | None, jobs: list[tuple]) -> dict[tuple, str]:
    """{(kind, n, k, cfg): why} of the jobs that failed to compile in the pool's workers (nothing without a pool)."""
    if pool is None or not jobs:
        return {}
    return {job[:4]: err for job, err in pool.map(_compile_job, jobs, chunksize=2) if err is not None}


# --- The measurements of one shape on the GPU -----------------------------------------------------------------------

class ShapeBench:
    """Weight copies, inputs and the measurements of one shape; measuring stops at `deadline` (time.monotonic)."""

    def __init__(self, shape: GemmShape, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
                 deadline: float | None = None) -> None:
        self.shape, self.dtype, self.deadline = shape, dtype, deadline
        device = torch.device(device)
        torch.manual_seed(0)
        self.ws = [torch.randn(shape.n, shape.k, device=device, dtype=dtype) * 0.02 for _ in range(REPS)]
        self.xs = {m: torch.randn(m, shape.k, device=device, dtype=dtype) for m in MS}
        self.rope = rope_operands(shape.heads, dtype, device)
        self.times: dict[str, dict[str, dict[int, float]]] = {}
        self.failed: dict[str, str] = {}
        self.skipped = 0

    def time(self, kind: str, cfg: Config, ms: tuple[int, ...] = RULE_MS,
             known_bad: dict | None = None) -> float | None:
        """`rule_score` of the us per call (each M of `ms` recorded), or None (recorded in `failed`, or counted in
        `skipped` past the deadline)."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.skipped += 1
            return None
        key = f"{kind} {cfg}"
        why = (known_bad or {}).get((kind, self.shape.n, self.shape.k, cfg))
        try:
            why = why or check(kind, self.xs[32], self.ws[0], cfg, self.rope)
            if why is None:
                per_m = self.times.setdefault(kind, {}).setdefault(str(cfg), {})
                for m in ms:
                    run = variant(kind, self.xs[m], self.rope, m)
                    per_m[m] = graph_us(lambda i, r=run: r(self.ws[i], cfg))
                return rule_score(per_m)
        except Exception as e:  # noqa: BLE001 - a config may fail to compile or launch
            why = f"{type(e).__name__}: {str(e)[:200]}"
        self.failed[key] = why
        logger.info("  %s %s: skipped (%s)", self.shape.name, key, why)
        return None

    def baselines(self) -> None:
        """cuBLAS (F.linear) at every M and the one-row Triton GEMV with its table config (or the derived one)."""
        self.times["cublas"] = {"F.linear": {m: graph_us(lambda i, x=self.xs[m]: F.linear(x, self.ws[i]))
                                             for m in MS}}
        s = self.shape
        cfg = gemv.config_for("plain", s.n, s.k, self.xs[1].device, self.dtype) or gemv.default_config(s.k)
        self.times["gemv"] = {str(cfg): {1: graph_us(lambda i: gemv.gemv_triton(self.xs[1], self.ws[i], None, cfg))}}


# --- The search ------------------------------------------------------------------------------------------------------

def best(scores: dict[Config, float], top: int) -> list[Config]:
    return sorted(scores, key=scores.get)[:top]


def _jobs(sb: GemmBench, kinds: tuple[str, ...], configs: list[Config], dtype: str) -> list[tuple]:
    s = sb.shape
    return [(kind, s.n, s.k, c, s.heads, dtype) for c in configs for kind in kinds]


def _plain_scores(sb: GemmBench, pool: Executor | None, quick: bool, sms: int, dtype: str) -> dict[Config, float]:
    """Steps 1 and 2: `rule_score` per plain config that worked."""
    stage1 = stage1_configs(sb.shape.n, sb.shape.k, quick, sms)
    bad = precompile(pool, _jobs(sb, ("plain",), stage1, dtype))
    scores = {c: s for c in stage1 if (s := sb.time("plain", c, known_bad=bad)) is not None}
    stage2 = stage2_configs(best(scores, TOP))
    bad = precompile(pool, _jobs(sb, ("plain",), stage2, dtype))
    scores.update({c: s for c in stage2 if (s := sb.time("plain", c, known_bad=bad)) is not None})
    return scores


def sweep_shape(sb: GemmBench, pool: Executor | None = None, quick: bool = False, sms: int = 132,
                dtype: str = "float16") -> dict[str, Any] | None:
    """The chosen config of one shape and how it was chosen ({"chosen", "plain_best", "plain_sum_us"[, "fused",
    "fused_best", "fused_sum_us"]}), or None when no config worked or none was measured in time."""
    sb.baselines()
    scores = _plain_scores(sb, pool, quick, sms, dtype)
    if not scores:
        return None
    chosen = best(scores, 1)[0]
    result: dict[str, Any] = {"plain_best": chosen, "plain_sum_us": scores[chosen]}
    if fused := sb.shape.fused:
        finalists = best({c: s for c, s in scores.items() if sb.shape.fuses(c)}, TOP)
        bad = precompile(pool, _jobs(sb, (fused, fused + "_unfused"), finalists, dtype))
        fused_scores = {c: s for c in finalists if (s := sb.time(fused, c, MS, known_bad=bad)) is not None}
        for c in finalists:
            sb.time(fused + "_unfused", c, MS, known_bad=bad)
        if fused_scores:
            chosen = best(fused_scores, 1)[0]
            result.update(fused=fused, fused_best=chosen, fused_sum_us=fused_scores[chosen])
    timed = sb.times["plain"][str(chosen)]
    sb.time("plain", chosen, tuple(m for m in MS if m not in timed))  # the chosen config at every decode bucket
    result["chosen"] = chosen
    return result


def chosen_us(sb: GemmBench, result: dict[str, Any]) -> dict[int, float]:
    """us per call by M of what the model runs with the chosen config (the fused variant where there is one)."""
    return sb.times.get(result.get("fused", "plain"), {}).get(str(result["chosen"]), {})
