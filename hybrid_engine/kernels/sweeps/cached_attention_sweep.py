"""Choose the cached-prefill attention's config per new-token count on the present card
(kernels/cached_prefill_attention.py, family "cached_attention" of the tuning table, key
"tokens,heads,head_dim,dtype").

Operands: a paged cache of 16-token blocks behind a block table for CAPACITY positions (random, non-contiguous
blocks), new-token counts x cached starts; each call reads its own copy of the cache (COPIES rotate past L2, as each
layer has its own). Compiles dominate (each (tile, SPLITS) is its own kernel), so the search runs in two phases
within the budget:
1. tiles: every (BLOCK_M, BLOCK_N, warps, stages) on the longest start, per token count (until half the budget is
   spent), each at the SPLITS that give about one and about two programs per SM (`wave_splits`; a fixed SPLITS
   would favour the tiles whose grid it happens to fit; a tile is ranked by its faster grid: on the H200, 96 new
   tokens after 2,000 keys, (64, 128, 4, 3) ran 26.5 us at one program per SM and 37.0 at two);
2. splits: the best TOP_TILES tiles x SPLITS 1/2/3/4/6/8/16 at every start, beside the unsplit kernel as it was before
   the keys were split and the current `cached_config` choice.
Every config is checked once against the fp32 reference (max abs error); configs that fail to compile or are wrong
are recorded and skipped. The choice per token count (`recommend`): the config whose worst excess in us over the best
time at any start is smallest (one graph, hence one config, serves every start; the excess is what a request's TTFT
pays per layer, where a ratio would weigh a microsecond at start 0 like ten at start 2000).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from .. import cached_prefill_attention as cpa
from ..cached_prefill_attention import TUNED_SMS
from .._triton import cdiv
from .._workspace import clear_split_buffers, sm_count
from ..prefill_attention import config_for as prefill_config_for
from .timing import graph_us

logger = logging.getLogger(__name__)

TOKENS = (32, 96, 144, 256, 512)  # 96: an agent turn (a message plus the partly cached last block)
STARTS = (0, 480, 1000, 2000)
BLOCK_SIZE, CAPACITY, COPIES = 16, 4096, 4
TILES = [(bm, bn, w, st) for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)
         if not (bm == 16 and w == 8) and not (bm == 128 and w == 4)]  # 16 rows need no 8 warps; 128 need them
SPLITS = (1, 2, 3, 4, 6, 8, 16)
PROGRAMS_PER_SM = (1, 2)  # phase 1 measures each tile at about these many programs per SM
TOP_TILES = 4
MAX_ERROR = 2e-2  # fp16 output vs the fp32 reference
Config = tuple[int, int, int, int, int]
Tile = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class AttentionShape:
    """The heads one rank's attention sees: query heads, KV heads, head_dim."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


class AttentionBench(Protocol):
    """What the search needs: `Sweep` on the GPU, a fake in tests."""

    failed: dict[str, str]
    skipped: int
    shape: AttentionShape
    sms: int

    def measure(self, tokens: int, cfg: Config, start: int, check_start: int,
                share: float = 1.0) -> float | None: ...

    def fixed_configs(self, tokens: int) -> dict[str, Config]: ...


class Sweep:
    """Operands of one attention shape and the measurements, failures and checks of the whole run; measuring stops
    once `budget_s` seconds have passed since it was made."""

    def __init__(self, shape: AttentionShape, budget_s: float, dtype: torch.dtype = torch.float16,
                 device: str | torch.device = "cuda") -> None:
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.sms = sm_count(self.device) if self.device.type == "cuda" else TUNED_SMS  # the CPU: tests only
        self.t0, self.budget_s = time.monotonic(), budget_s
        self.scale = shape.head_dim ** -0.5
        blocks = CAPACITY // BLOCK_SIZE
        self.table = torch.randperm(blocks + 64, device=self.device)[:blocks].to(torch.int32)
        cache = (blocks + 64, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim)
        self.caches = [(torch.randn(cache, device=self.device, dtype=dtype),
                        torch.randn(cache, device=self.device, dtype=dtype)) for _ in range(COPIES)]
        self.start_t = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.queries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.failed: dict[str, str] = {}
        self.errors: dict[str, float] = {}
        self.refs: dict[tuple[int, int], torch.Tensor] = {}
        self.skipped = 0

    def left(self, share: float = 1.0) -> bool:
        return time.monotonic() - self.t0 < share * self.budget_s

    def fixed_configs(self, tokens: int) -> dict[str, Config]:
        """The configs every token count is compared with: the kernel before the keys were split, and what
        `cached_config` chooses today."""
        s = self.shape
        return {"unsplit (before)": (prefill_config_for(tokens)[0], 64, 4, 2, 1),
                "cached_config": cpa.cached_config(tokens, CAPACITY, s.num_heads, self.device, s.head_dim,
                                                   self.dtype)}

    def query(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q [tokens, heads, head_dim] and its valid length as a device tensor, made once per token count."""
        if tokens not in self.queries:
            q = torch.randn(tokens, self.shape.num_heads, self.shape.head_dim, device=self.device, dtype=self.dtype)
            self.queries[tokens] = q, torch.tensor([tokens], dtype=torch.int32, device=self.device)
        return self.queries[tokens]

    def run(self, tokens: int, cfg: Config, copy: int) -> torch.Tensor:
        q, valid_t = self.query(tokens)
        k, v = self.caches[copy % COPIES]
        return cpa.cached_prefill_attention_triton(q, k, v, self.table, self.start_t, self.scale, valid_t,
                                                   config=cfg)

    def check(self, tokens: int, cfg: Config, start: int) -> bool:
        """Whether `cfg`'s max abs error against the fp32 reference at `start` is within MAX_ERROR (computed once
        per (tokens, config))."""
        key = f"T={tokens} {cfg}"
        if key not in self.errors:
            self.start_t.fill_(start)
            ref = self.reference(tokens, start)
            self.errors[key] = (self.run(tokens, cfg, 0).float() - ref).abs().max().item()
            if self.errors[key] > MAX_ERROR:
                logger.info("  %s: WRONG, max abs error %.3g", key, self.errors[key])
        return self.errors[key] <= MAX_ERROR

    def reference(self, tokens: int, start: int) -> torch.Tensor:
        if (tokens, start) not in self.refs:
            k, v = self.caches[0]
            self.refs[tokens, start] = cpa.cached_prefill_attention_ref(self.query(tokens)[0].float(), k.float(),
                                                                        v.float(), self.table, start, self.scale)
        return self.refs[tokens, start]

    def measure(self, tokens: int, cfg: Config, start: int, check_start: int, share: float = 1.0) -> float | None:
        """us per call of `cfg` at `start` (None: failed, wrong, or out of budget)."""
        if str(cfg) in self.failed:
            return None
        if not self.left(share):
            self.skipped += 1
            return None
        try:
            if not self.check(tokens, cfg, check_start):
                return None
            self.start_t.fill_(start)
            return graph_us(lambda i: self.run(tokens, cfg, i))
        except Exception as e:  # noqa: BLE001 - a config may not compile (shared memory, registers)
            self.failed[str(cfg)] = f"{type(e).__name__}: {str(e)[:120]}"
            logger.info("  %s: failed %s", cfg, self.failed[str(cfg)])
            return None
        finally:
            clear_split_buffers()  # each graph_us stream gets its own workspace: free them between configs


def tiles_for(tokens: int) -> list[Tile]:
    """The tiles worth trying for `tokens` new tokens: BLOCK_M no larger than the tokens rounded up."""
    return [tile for tile in TILES if tile[0] <= max(16, 1 << (tokens - 1).bit_length())]


def wave_splits(tokens: int, block_m: int, num_heads: int, sms: int) -> list[int]:
    """The SPLITS that bring the grid (query tiles x heads x SPLITS) to about each PROGRAMS_PER_SM programs per SM
    (distinct, in that order)."""
    grid = cdiv(tokens, block_m) * num_heads
    return list(dict.fromkeys(max(1, min(max(SPLITS), round(p * sms / grid))) for p in PROGRAMS_PER_SM))


def phase_tiles(bench: AttentionBench, tokens: int, start: int) -> list[Tile]:
    """The TOP_TILES fastest tiles on `start`, each ranked by its faster `wave_splits` grid."""
    times: dict[Config, float] = {}
    for tile in tiles_for(tokens):
        for splits in wave_splits(tokens, tile[0], bench.shape.num_heads, bench.sms):
            us = bench.measure(tokens, (*tile, splits), start, start, share=0.5)
            if us is not None:
                times[(*tile, splits)] = us
    ranked = sorted(times, key=times.get)
    logger.info("T=%4d tiles at start %d: %s", tokens, start, "  ".join(f"{c}:{times[c]:.1f}" for c in ranked[:6]))
    return list(dict.fromkeys(cfg[:4] for cfg in ranked))[:TOP_TILES]


def phase_splits(bench: AttentionBench, tokens: int, tiles: list[Tile], starts: list[int],
                 fixed: list[Config]) -> dict[int, dict[Config, float]]:
    """{start: {config: us}} of tiles x SPLITS and the `fixed` configs at every start."""
    configs = list(dict.fromkeys([*fixed, *((*tile, s) for tile in tiles for s in SPLITS)]))
    out: dict[int, dict[Config, float]] = {s: {} for s in starts}
    for cfg in configs:
        for start in starts:
            us = bench.measure(tokens, cfg, start, max(starts))
            if us is not None:
                out[start][cfg] = us
    return out


def sweep_tokens(bench: AttentionBench, tokens: int,
                 starts: list[int]) -> tuple[dict[int, dict[Config, float]], dict[str, Config]]:
    """Both phases for one token count: ({start: {config: us}}, the fixed configs compared)."""
    fixed = bench.fixed_configs(tokens)
    tiles = phase_tiles(bench, tokens, max(starts))
    return phase_splits(bench, tokens, tiles, starts, list(fixed.values())), fixed


def recommend(times: dict[int, dict[Config, float]]) -> tuple[Config | None, float]:
    """The config measured at every start whose worst excess over that start's best (us, what a request's TTFT
    pays per layer) is smallest (ties: least total); returns it with its worst ratio to the best."""
    starts = list(times)
    best = {s: min(times[s].values()) for s in starts if times[s]}
    common = [c for c in times[starts[0]] if all(c in times[s] for s in starts)]
    if not common or len(best) < len(starts):
        return None, float("inf")
    score = {c: (max(times[s][c] - best[s] for s in starts), sum(times[s][c] for s in starts)) for c in common}
    cfg = min(common, key=score.get)
    return cfg, max(times[s][cfg] / best[s] for s in starts)
