"""Cached-prefill attention configs on the GPU: µs per call from CUDA-graph replays, LLaMA-2-7B heads (32 x 128,
fp16), a paged cache of 16-token blocks behind a block table for 4,096 positions (random, non-contiguous blocks),
new-token counts x cached starts.

    PYTHONPATH=. python3 benchmarks/cached_attn_sweep.py [--tokens 32,144,256,512] [--starts 0,480,1000,2000]
        [--budget-s 170] [--json out.json]

Compiles dominate (each (tile, SPLITS) is its own kernel), so the sweep runs in two phases within --budget-s:
1. tiles: every (BLOCK_M, BLOCK_N, warps, stages) at TILE_SPLITS on the longest start, per token count (half the
   budget at most);
2. splits: the best TOP_TILES tiles x SPLITS 1/2/4/8/16 at every start, beside the unsplit kernel as it was before
   the keys were split and the current `cached_config` choice.
Each call reads its own copy of the cache (COPIES rotate past L2, as each layer has its own). Every config is checked
once against the fp32 reference (max abs error); configs that fail to compile or are wrong are recorded and skipped.
Prints the best configs per (tokens, start) and the CACHED_CONFIGS to paste: per token count, the config whose worst
ratio to the best time over the starts is smallest (one graph, hence one config, serves every start).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_bench import graph_us  # noqa: E402

from hybrid_engine.kernels import cached_prefill_attention as cpa  # noqa: E402
from hybrid_engine.kernels import tuning  # noqa: E402
from hybrid_engine.kernels._workspace import clear_split_buffers, sm_count  # noqa: E402
from hybrid_engine.kernels.prefill_attention import config_for  # noqa: E402

HEADS, DIM, BLOCK_SIZE, CAPACITY, COPIES = 32, 128, 16, 4096, 4
DEVICE = torch.device("cuda")
SCALE = DIM ** -0.5
TILES = [(bm, bn, w, st) for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)
         if not (bm == 16 and w == 8) and not (bm == 128 and w == 4)]  # 16 rows need no 8 warps; 128 need them
SPLITS = (1, 2, 4, 8, 16)
TILE_SPLITS = 4  # phase 1 compares tiles at this SPLITS
TOP_TILES = 3
MAX_ERROR = 2e-2  # fp16 output vs the fp32 reference


class Sweep:
    """Operands of one token count and the measurements, failures and checks of the whole run."""

    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget_s = time.monotonic(), budget_s
        blocks = CAPACITY // BLOCK_SIZE
        self.table = torch.randperm(blocks + 64, device=DEVICE)[:blocks].to(torch.int32)
        shape = (blocks + 64, BLOCK_SIZE, HEADS, DIM)
        self.caches = [(torch.randn(shape, device=DEVICE, dtype=torch.float16),
                        torch.randn(shape, device=DEVICE, dtype=torch.float16)) for _ in range(COPIES)]
        self.start_t = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        self.failed: dict[str, str] = {}
        self.errors: dict[str, float] = {}
        self.refs: dict[tuple[int, int], torch.Tensor] = {}
        self.skipped = 0

    def left(self, share: float = 1.0) -> bool:
        return time.monotonic() - self.t0 < share * self.budget_s

    def run(self, q, valid_t, cfg, copy) -> torch.Tensor:
        k, v = self.caches[copy % COPIES]
        return cpa.cached_prefill_attention_triton(q, k, v, self.table, self.start_t, SCALE, valid_t, config=cfg)

    def check(self, q, valid_t, cfg, start: int) -> bool:
        """Max abs error of `cfg` against the fp32 reference at `start`, once per (tokens, config)."""
        key = f"T={q.shape[0]} {cfg}"
        if key not in self.errors:
            self.start_t.fill_(start)
            ref = self.reference(q, start)
            self.errors[key] = (self.run(q, valid_t, cfg, 0).float() - ref).abs().max().item()
            if self.errors[key] > MAX_ERROR:
                print(f"  {key}: WRONG, max abs error {self.errors[key]:.3g}", flush=True)
        return self.errors[key] <= MAX_ERROR

    def reference(self, q, start: int) -> torch.Tensor:
        if (q.shape[0], start) not in self.refs:
            k, v = self.caches[0]
            self.refs[q.shape[0], start] = cpa.cached_prefill_attention_ref(q.float(), k.float(), v.float(),
                                                                            self.table, start, SCALE)
        return self.refs[q.shape[0], start]

    def measure(self, q, valid_t, cfg, start: int, check_start: int, share: float = 1.0) -> float | None:
        """µs per call of `cfg` at `start` (None: failed, wrong, or out of budget)."""
        if str(cfg) in self.failed:
            return None
        if not self.left(share):
            self.skipped += 1
            return None
        try:
            if not self.check(q, valid_t, cfg, check_start):
                return None
            self.start_t.fill_(start)
            return graph_us(lambda i: self.run(q, valid_t, cfg, i))
        except Exception as e:  # noqa: BLE001 - a config may not compile (shared memory, registers)
            self.failed[str(cfg)] = f"{type(e).__name__}: {str(e)[:120]}"
            print(f"  {cfg}: failed {self.failed[str(cfg)]}", flush=True)
            return None
        finally:
            clear_split_buffers()  # each graph_us stream gets its own workspace: free them between configs


def _tiles_for(t: int) -> list[tuple[int, int, int, int]]:
    return [tile for tile in TILES if tile[0] <= max(16, 1 << (t - 1).bit_length())]


def _phase_tiles(sweep: Sweep, q, valid_t, start: int) -> list[tuple[int, int, int, int]]:
    """The TOP_TILES fastest tiles at TILE_SPLITS on `start`."""
    times = {}
    for tile in _tiles_for(q.shape[0]):
        us = sweep.measure(q, valid_t, (*tile, TILE_SPLITS), start, start, share=0.5)
        if us is not None:
            times[tile] = us
    ranked = sorted(times, key=times.get)
    print(f"T={q.shape[0]:4d} tiles at SPLITS {TILE_SPLITS}, start {start}: "
          + "  ".join(f"{c}:{times[c]:.1f}" for c in ranked[:6]), flush=True)
    return ranked[:TOP_TILES]


def _phase_splits(sweep: Sweep, q, valid_t, tiles, starts, fixed) -> dict[int, dict]:
    """{start: {config: µs}} of tiles x SPLITS and the `fixed` configs at every start."""
    configs = list(dict.fromkeys([*fixed, *((*tile, s) for tile in tiles for s in SPLITS)]))
    out: dict[int, dict] = {s: {} for s in starts}
    for cfg in configs:
        for start in starts:
            us = sweep.measure(q, valid_t, cfg, start, max(starts))
            if us is not None:
                out[start][cfg] = us
    return out


def recommend(times: dict[int, dict]) -> tuple[tuple | None, float]:
    """The config measured at every start whose worst ratio to that start's best is smallest (ties: least total)."""
    starts = list(times)
    best = {s: min(times[s].values()) for s in starts if times[s]}
    common = [c for c in times[starts[0]] if all(c in times[s] for s in starts)]
    if not common or len(best) < len(starts):
        return None, float("inf")
    score = {c: (max(times[s][c] / best[s] for s in starts), sum(times[s][c] for s in starts)) for c in common}
    cfg = min(common, key=score.get)
    return cfg, score[cfg][0]


def _report(t: int, times: dict[int, dict], fixed: dict[str, tuple]) -> dict:
    cfg, worst = recommend(times)
    for start, res in times.items():
        ranked = sorted(res.items(), key=lambda kv: kv[1])
        line = "  ".join(f"{c}:{u:.1f}" for c, u in ranked[:5])
        base = "  ".join(f"{name} {c}:{res[c]:.1f}" for name, c in fixed.items() if c in res)
        print(f"T={t:4d} start={start:5d} best {line}\n{'':17s}{base}", flush=True)
    if cfg is not None:
        per_start = ", ".join(f"{s}: {times[s][cfg]:.1f} us ({32 * times[s][cfg] / 1e3:.2f} ms / 32 layers)"
                              for s in times)
        print(f"T={t:4d} recommended {cfg} (worst {worst:.2f}x the best per start): {per_start}", flush=True)
    return {"tokens": t, "recommended": cfg, "worst_ratio": worst, "fixed": {k: str(v) for k, v in fixed.items()},
            "by_start": {s: sorted(((str(c), round(u, 2)) for c, u in res.items()), key=lambda x: x[1])
                         for s, res in times.items()}}


def _table(rows: list[dict]) -> str:
    """CACHED_CONFIGS literal; SPLITS converted to the table's reference (TUNED_HEADS heads on TUNED_SMS SMs)."""
    sms = sm_count(DEVICE)
    done = [r for r in rows if r["recommended"] is not None]
    entries = []
    for i, row in enumerate(done):
        *tile, splits = row["recommended"]
        tuned = max(1, round(splits * HEADS * sms / (cpa.TUNED_HEADS * cpa.TUNED_SMS)))
        entries.append(f"({row['tokens'] if i < len(done) - 1 else '1 << 30'}, {(*tile, tuned)})")
    return "CACHED_CONFIGS = [" + ", ".join(entries) + "]"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="32,144,256,512")
    p.add_argument("--starts", default="0,480,1000,2000")
    p.add_argument("--budget-s", type=float, default=170.0)
    p.add_argument("--json")
    p.add_argument("--no-save", action="store_true",
                   help="do not write the recommended configs to the user tuning cache (kernels/tuning.py)")
    args = p.parse_args()
    starts = [int(s) for s in args.starts.split(",")]
    sweep, rows = Sweep(args.budget_s), []
    for t in [int(v) for v in args.tokens.split(",")]:
        q = torch.randn(t, HEADS, DIM, device=DEVICE, dtype=torch.float16)
        valid_t = torch.tensor([t], dtype=torch.int32, device=DEVICE)
        fixed = {"unsplit (before)": (config_for(t)[0], 64, 4, 2, 1),
                 "cached_config": cpa.cached_config(t, CAPACITY, HEADS, DEVICE)}
        tiles = _phase_tiles(sweep, q, valid_t, max(starts))
        rows.append(_report(t, _phase_splits(sweep, q, valid_t, tiles, starts, list(fixed.values())), fixed))
        if rows[-1]["recommended"] is not None and not args.no_save:  # the engine on this card reads it
            tuning.save("cached_attention", {tuning.shape_key(t, HEADS, DIM, dtype=q.dtype): rows[-1]["recommended"]},
                        torch.cuda.get_device_name())
    print(_table(rows))
    if sweep.skipped:
        print(f"budget of {args.budget_s:.0f} s spent: {sweep.skipped} measurements skipped")
    if sweep.failed:
        print(f"{len(sweep.failed)} configs failed to compile or run: {sorted(sweep.failed)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "sms": sm_count(DEVICE), "heads": HEADS,
            "head_dim": DIM, "block_size": BLOCK_SIZE, "capacity": CAPACITY, "rows": rows, "table": _table(rows),
            "failed": sweep.failed, "max_abs_error": sweep.errors, "skipped": sweep.skipped}, indent=1))


if __name__ == "__main__":
    main()
