"""Choose the one-row GEMV's config per weight shape on the present card (kernels/gemv.py, tuning-table families
"gemv" (plain), "gemv_silu" (gate/up with SiLU-mul) and "gemv_rope" (QKV with rope + KV store), key "N,K,dtype").

Batch 1 decodes through these kernels, so their speed is the engine's TPOT. Each number is us per call at one row
from one CUDA graph of REPS calls, each on its own weight copy (`timing.graph_us`); every config is first checked
against the fp32 reference. Candidates (`candidates`): rows per program (BLOCK_N; BLOCK_J column pairs for rope,
which must divide the rotary half) x BLOCK_K 512..4096 (capped at K rounded up to a power of two) x 4 / 8 warps
(8 only for tiles of >= 4096 elements). Rule: the least us. For the plain kind cuBLAS (F.linear) is timed too, and
chosen (saved as an empty entry) where it is faster; for the fused kinds the baseline is the config the engine used
before, and the fused kernel is kept (the unfused pair costs an extra launch and the intermediate's round trip).

The fused kinds are then timed with the RMSNorm before them folded in (families "gemv_silu_norm" / "gemv_rope_norm",
`sweep_gemv_norm`): the candidates add taller tiles (fewer programs re-read the residual and the norm weight), and
the baseline is the norm kernel followed by the fused kind on its chosen config, both in the one graph; where that
is faster the entry is empty and the engine keeps the norm apart for the shape.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Protocol

import torch
import torch.nn.functional as F

from .. import gemv
from .._triton import next_pow2
from ..rms_norm import rms_norm_ref, rms_norm_triton
from .decode_gemm_sweep import GemmShape
from .timing import REPS, graph_us

logger = logging.getLogger(__name__)

KIND_OF = {"silu": "gate_up", "rope": "qkv"}  # GemmShape.fused -> the GEMV variant the model runs at one row
MAX_ERROR = 2e-2  # fp16 output vs the fp32 reference (weights scaled to 0.02: outputs of order 1)
Config = tuple[int, int, int, int]


def kind_of(shape: GemmShape) -> str:
    """The GEMV variant of a decode projection: QKV (with its heads known) fuses rope, gate/up SiLU-mul."""
    return KIND_OF.get(shape.fused, "plain")


def candidates(shape: GemmShape, norm: bool = False) -> list[Config]:
    """(BLOCK_N or BLOCK_J, BLOCK_K, num_warps, num_stages) worth timing for `shape` (norm: its fused kind with the
    norm folded in)."""
    kind = kind_of(shape)
    cap = next_pow2(shape.k)
    block_ks = sorted({min(bk, cap) for bk in (512, 1024, 2048, 4096)})
    rows = (1, 2, 4, 8, 16) if norm else (1, 2, 4) if kind != "plain" else (2, 4, 8)
    if kind == "qkv":
        half = shape.heads[2] // 2
        rows = tuple(r for r in rows if half % r == 0)
    out = []
    for bn, bk, warps in itertools.product(rows, block_ks, (4, 8)):
        if warps == 8 and bn * bk < 4096:
            continue
        out.append((bn, bk, warps, 1))
    return out


class GemvBench(Protocol):
    """What the search needs: `GpuGemvBench` on the GPU, a fake in tests."""

    shape: GemmShape
    failed: dict[str, str]
    skipped: int

    def cublas_us(self) -> float | None: ...

    def time(self, cfg: Config) -> float | None: ...

    def time_norm(self, cfg: Config) -> float | None: ...

    def apart_us(self, cfg: Config) -> float | None: ...


class GpuGemvBench:
    """Weight copies, the one-row input and (QKV) rope operands of one shape; measuring stops at `deadline`."""

    def __init__(self, shape: GemmShape, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
                 deadline: float | None = None) -> None:
        self.shape, self.kind, self.dtype, self.deadline = shape, kind_of(shape), dtype, deadline
        self.device = torch.device(device)
        torch.manual_seed(0)
        self.ws = [torch.randn(shape.n, shape.k, device=self.device, dtype=dtype) * 0.02 for _ in range(REPS)]
        self.x = torch.randn(1, shape.k, device=self.device, dtype=dtype)
        self.failed: dict[str, str] = {}
        self.skipped = 0
        if self.kind == "qkv":
            hq, hkv, dim = shape.heads
            freqs = torch.outer(torch.arange(64, dtype=torch.float32),
                                1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(self.device)
            self.caches = [torch.zeros(4, 16, hkv, dim, device=self.device, dtype=dtype) for _ in range(2)]
            self.pos = torch.tensor([7], device=self.device)
            self.slot = torch.tensor([21], device=self.device)
        if self.kind != "plain":  # the norm folded in: a residual and a norm weight of order 1
            self.norm = (torch.randn(1, shape.k, device=self.device, dtype=dtype),
                         1 + 0.1 * torch.randn(shape.k, device=self.device, dtype=dtype), 1e-5)

    def _run(self, w: torch.Tensor, cfg: Config, x: torch.Tensor | None = None,
             norm: gemv.Norm | None = None) -> torch.Tensor:
        x = self.x if x is None else x
        if self.kind == "gate_up":
            out = gemv.gemv_silu_triton(x, w, cfg, norm)
        elif self.kind == "qkv":
            hq, hkv, _ = self.shape.heads
            out = gemv.gemv_rope_store_triton(x, w, None, self.pos, self.cos_sin, *self.caches, self.slot, hq,
                                              hkv, cfg, norm)
        else:
            out = gemv.gemv_triton(x, w, None, cfg)
        return out[0] if norm is not None else out

    def _reference(self, norm: bool = False) -> torch.Tensor:
        x, w = self.x.float(), self.ws[0].float()
        if norm:
            residual, g, eps = self.norm
            x, _ = rms_norm_ref(x, g.float(), eps, residual.float())
        if self.kind == "gate_up":
            return gemv.linear_silu_mul_ref(x, w)
        if self.kind == "qkv":
            hq, hkv, _ = self.shape.heads
            caches = [c.float().clone() for c in self.caches]
            return gemv.linear_rope_store_ref(x, w, None, self.pos, self.cos_sin, *caches, self.slot, hq, hkv)
        return gemv.linear_ref(x, w)

    def cublas_us(self) -> float | None:
        """F.linear at one row (the plain kind's alternative), None for the fused kinds."""
        if self.kind != "plain":
            return None
        return graph_us(lambda i: F.linear(self.x, self.ws[i]))

    def time(self, cfg: Config) -> float | None:
        """us per call of `cfg`, or None (failed or wrong: recorded in `failed`; past the deadline: counted)."""
        return self._timed(cfg, folded=False, apart=False)

    def time_norm(self, cfg: Config) -> float | None:
        """us per call of the fused kind on `cfg` with the RMSNorm before it folded in (as `time`)."""
        return self._timed(cfg, folded=True, apart=False)

    def apart_us(self, cfg: Config) -> float | None:
        """us per norm kernel + fused kind on `cfg` (the engine's step without the folding), as `time`."""
        return self._timed(cfg, folded=False, apart=True)

    def _timed(self, cfg: Config, folded: bool, apart: bool) -> float | None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.skipped += 1
            return None
        label = f"{cfg}{' norm folded' if folded else ' norm apart' if apart else ''}"
        if apart:
            residual, g, eps = self.norm

            def call(w: torch.Tensor) -> torch.Tensor:
                return self._run(w, cfg, rms_norm_triton(self.x, g, eps, residual)[0])
        else:
            def call(w: torch.Tensor) -> torch.Tensor:
                return self._run(w, cfg, norm=self.norm if folded else None)
        try:
            err = (call(self.ws[0]).float() - self._reference(folded or apart)).abs().max().item()
            if err > MAX_ERROR:
                raise ValueError(f"max abs error {err:.3g} > {MAX_ERROR}")
            return graph_us(lambda i: call(self.ws[i]))
        except Exception as e:  # noqa: BLE001 - a config may fail to compile or launch
            self.failed[label] = f"{type(e).__name__}: {str(e)[:200]}"
            logger.info("  %s %s: skipped (%s)", self.shape.label, label, self.failed[label])
            return None


def sweep_gemv(bench: GemvBench, before: Config | None) -> dict:
    """{"chosen": config, or () where cuBLAS is faster (plain kind), or None where nothing was measured;
    "us": its time; "baseline_us": cuBLAS (plain) or the config used before (`before`, fused kinds)}."""
    configs = candidates(bench.shape)
    if before is not None and tuple(before) not in configs:
        configs.append(tuple(before))
    times = {cfg: us for cfg in configs if (us := bench.time(cfg)) is not None}
    cublas = bench.cublas_us()
    baseline = cublas if cublas is not None else (times.get(before) if before is not None else None)
    if not times:
        return {"chosen": None, "us": None, "baseline_us": baseline}
    chosen = min(times, key=times.get)
    if cublas is not None and cublas < times[chosen]:
        return {"chosen": (), "us": cublas, "baseline_us": cublas, "gemv_best": chosen, "gemv_us": times[chosen]}
    return {"chosen": chosen, "us": times[chosen], "baseline_us": baseline}


def sweep_gemv_norm(bench: GemvBench, apart_config: Config | None) -> dict:
    """The fused kind with the norm folded in: {"chosen": the fastest config, or () where the norm kernel followed
    by the kind on `apart_config` (its chosen config) is faster, or None where nothing was measured; "us": the
    choice's time; "baseline_us": norm + kind apart}."""
    times = {cfg: us for cfg in candidates(bench.shape, norm=True) if (us := bench.time_norm(cfg)) is not None}
    apart = bench.apart_us(apart_config) if apart_config is not None else None
    if not times:
        return {"chosen": None, "us": None, "baseline_us": apart}
    chosen = min(times, key=times.get)
    if apart is not None and apart <= times[chosen]:
        return {"chosen": (), "us": apart, "baseline_us": apart, "folded_best": chosen, "folded_us": times[chosen]}
    return {"chosen": chosen, "us": times[chosen], "baseline_us": apart}
