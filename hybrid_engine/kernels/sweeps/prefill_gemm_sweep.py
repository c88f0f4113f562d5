"""Choose the prefill projection plan per weight shape and row count on the present card (kernels/gemm.py's
`config_for`, family "prefill_gemm" of the tuning table, key "N,K,dtype").

A prefill step of M rows (a prompt bucket) runs each projection through one of: cuBLAS (`cublas`, F.linear),
cuBLASLt (`lt`, F.linear with a zero bias), cuBLAS / cuBLASLt on the weight's transposed copy (`t`, `t_lt`; only
for the shapes whose model keeps one, QKV and gate/up), the decode GEMM (`decode_gemm`, M <= 32: it streams the
weight once and takes part in programmatic dependent launch) or the Triton GEMM with a config (a 5-tuple). Each is
timed per M as `timing.graph_us` times it (one CUDA graph of REPS calls, each on its own weight copy, so weights
come from HBM as in a step); every Triton and decode GEMM config is first checked against the fp32 reference, and
one that fails or is wrong is recorded and skipped.

Rule (`plan_from`): per M the fastest choice, a non-cuBLAS one only where it beats cuBLAS by MARGIN (no kernel
change for noise); runs of the same choice are merged into (max_M, choice) ranges, and trailing cuBLAS ranges
dropped (past the plan's last entry cuBLAS serves).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Protocol, Union

import torch
import torch.nn.functional as F

from .. import decode_gemm as dg
from .. import gemm
from ..gemv import linear_ref
from .timing import REPS, graph_us

logger = logging.getLogger(__name__)

MS = (16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256, 288, 320, 384, 448, 512)
CUBLAS = ("cublas", "lt")
TRANSPOSED = ("t", "t_lt")
# Triton GEMM configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried per row range: the H100 plan's picks
# and their neighbours (benchmarks/gemm_bench.py swept a wider grid on the H100).
TRITON_SMALL = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 4, 4),
                (16, 64, 256, 4, 3)]
TRITON_MID = [(64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 128, 64, 8, 4),
              (128, 64, 64, 4, 4)]
TRITON_BIG = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3)]
MARGIN = 0.02
MAX_ERROR = 4e-3  # fp16 output vs the fp32 reference, relative to the reference's largest magnitude
Choice = Union[str, tuple[int, ...]]


def label(choice: Choice) -> str:
    """A choice as text: the string itself, or "triton:64,64,128,4,4"."""
    return choice if isinstance(choice, str) else "triton:" + ",".join(map(str, choice))


def candidates(m: int, transposed: bool) -> list[Choice]:
    """What is timed at M rows; `transposed`: the model keeps a transposed copy of this weight."""
    out: list[Choice] = [*CUBLAS, *(TRANSPOSED if transposed else ())]
    if m <= dg.DECODE_MAX_ROWS:
        out.append("decode_gemm")
    out += TRITON_SMALL if m <= 32 else TRITON_MID if m <= 128 else TRITON_BIG
    return out


class PrefillGemmBench(Protocol):
    """What the search needs: `GpuPrefillGemmBench` on the GPU, a fake in tests."""

    failed: dict[str, str]
    skipped: int

    def measure(self, choice: Choice, m: int) -> float | None: ...


class GpuPrefillGemmBench:
    """REPS copies of one weight [n, k] (and of its transpose where `transposed`), timing choices until `deadline`
    (time.monotonic()); a measurement asked for after it is skipped (None, counted in `skipped`)."""

    def __init__(self, n: int, k: int, transposed: bool, dtype: torch.dtype = torch.float16,
                 deadline: float = float("inf"), device: str = "cuda") -> None:
        torch.manual_seed(0)
        self.n, self.k, self.dtype, self.deadline = n, k, dtype, deadline
        self.ws = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(REPS)]
        self.wts = [w.t().contiguous() for w in self.ws] if transposed else []
        self.zero = torch.zeros(n, device=device, dtype=dtype)
        self.xs: dict[int, torch.Tensor] = {}
        self.checked: set[str] = set()
        self.failed: dict[str, str] = {}
        self.skipped = 0

    def _x(self, m: int) -> torch.Tensor:
        if m not in self.xs:
            self.xs[m] = torch.randn(m, self.k, device=self.ws[0].device, dtype=self.dtype)
        return self.xs[m]

    def _fn(self, choice: Choice, m: int) -> Callable[[int], torch.Tensor]:
        x = self._x(m)
        if choice == "cublas":
            return lambda i: F.linear(x, self.ws[i])
        if choice == "lt":
            return lambda i: F.linear(x, self.ws[i], self.zero)
        if choice == "t":
            return lambda i: F.linear(x, self.wts[i].t())
        if choice == "t_lt":
            return lambda i: F.linear(x, self.wts[i].t(), self.zero)
        if choice == "decode_gemm":
            return lambda i: dg.decode_gemm_triton(x, self.ws[i])
        return lambda i: gemm.gemm_triton(x, self.ws[i], config=choice)

    def measure(self, choice: Choice, m: int) -> float | None:
        name = label(choice)
        if name in self.failed:
            return None
        if time.monotonic() >= self.deadline:
            self.skipped += 1
            return None
        fn = self._fn(choice, m)
        try:
            if not isinstance(choice, str) or choice == "decode_gemm":
                key = f"{name}@{m % 16 == 0}"  # once per Triton specialisation of M
                if key not in self.checked:
                    ref = linear_ref(self._x(m), self.ws[0]).float()
                    err = (fn(0).float() - ref).abs().max().item()
                    if not err <= MAX_ERROR * max(1.0, ref.abs().max().item()):
                        self.failed[name] = f"wrong at M={m}: max abs error {err:.3g}"
                        return None
                    self.checked.add(key)
            return graph_us(fn)
        except Exception as exc:  # noqa: BLE001 - a config may not fit the card (shared memory, registers)
            self.failed[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            logger.info("prefill_gemm %dx%d %s failed: %s", self.n, self.k, name, self.failed[name])
            return None


def sweep_shape(bench: PrefillGemmBench, ms: tuple[int, ...] = MS,
                transposed: bool = False) -> dict[int, dict[str, float]]:
    """us per choice (by `label`) per M; what failed or was skipped is absent."""
    times: dict[int, dict[str, float]] = {}
    for m in ms:
        row = {}
        for choice in candidates(m, transposed):
            us = bench.measure(choice, m)
            if us is not None:
                row[label(choice)] = us
        times[m] = row
    return times


def parse(name: str) -> Choice:
    """`label`'s inverse."""
    if name.startswith("triton:"):
        return tuple(int(v) for v in name.removeprefix("triton:").split(","))
    return name


def choice_at(plan: list[list], m: int) -> str:
    """The `label` of what a plan (`plan_from`'s entries) chooses for m rows: past its last range, cuBLAS."""
    choice = next((c for max_m, c in plan if m <= max_m), "cublas")
    return label(tuple(choice) if isinstance(choice, list) else choice)


def plan_from(times: dict[int, dict[str, float]], margin: float = MARGIN) -> list[list]:
    """The plan entries [[max_M, choice], ...] (choice: "cublas", "lt", "t", "t_lt", "decode_gemm" or a Triton
    config as a list) from `sweep_shape`'s times: per M the fastest, a non-cuBLAS choice only where it is at least
    `margin` faster than cuBLAS; an M where cuBLAS was not measured is left out (its range joins the next M's)."""
    picks: list[tuple[int, str]] = []
    for m in sorted(times):
        row = times[m]
        if "cublas" not in row:
            continue
        best = min(row, key=row.get)
        picks.append((m, best if row[best] < row["cublas"] * (1 - margin) else "cublas"))
    merged: list[list] = []
    for m, name in picks:
        if merged and merged[-1][1] == name:
            merged[-1][0] = m
        else:
            merged.append([m, name])
    while merged and merged[-1][1] == "cublas":
        merged.pop()
    return [[m, list(c) if isinstance(c := parse(name), tuple) else c] for m, name in merged]
