"""The sweeps' correctness gates on the CPU (Triton interpreter): a config is timed only after its variant matches
the fp32 reference (and, for the decode GEMM, each row alone matches its row of the batch), with the model's own
head layout (grouped KV heads here)."""
from __future__ import annotations

import pytest
import torch

from hybrid_engine.kernels import decode_gemm as dg
from hybrid_engine.kernels.sweeps import cached_attention_sweep as cs
from hybrid_engine.kernels.sweeps import decode_gemm_sweep as ds

CPU = torch.device("cpu")
CFG = (16, 64, 1, 4, 2)


@pytest.mark.parametrize("swap", [0, 1])
def test_decode_gemm_variants_pass_the_check_with_grouped_kv_heads(swap):
    torch.manual_seed(0)
    heads = (4, 2, 32)  # QKV weight [(4 + 2 * 2) * 32, 64]
    qkv = torch.randn(8 * 32, 64) * 0.02
    gate_up = torch.randn(128, 64) * 0.02
    x32 = torch.randn(32, 64)
    rope = ds.rope_operands(heads, torch.float32, CPU)
    for kind in ("plain", "rope", "rope_unfused"):
        assert ds.check(kind, x32, qkv, (*CFG, swap), rope) is None, kind
    for kind in ("silu", "silu_unfused"):
        assert ds.check(kind, x32, gate_up, (*CFG, swap), rope) is None, kind


def test_a_wrong_or_row_dependent_variant_is_refused(monkeypatch):
    torch.manual_seed(0)
    w, x32 = torch.randn(64, 64) * 0.02, torch.randn(32, 64)
    rope = ds.rope_operands(None, torch.float32, CPU)
    real = dg.decode_gemm_triton
    monkeypatch.setattr(dg, "decode_gemm_triton", lambda x, w, b, c: real(x, w, b, c) + 0.1)
    assert ds.check("plain", x32, w, CFG, rope).startswith("wrong")
    monkeypatch.setattr(dg, "decode_gemm_triton", lambda x, w, b, c: real(x, w, b, c) * (1 + 1e-3 * (len(x) > 1)))
    assert ds.check("plain", x32, w, CFG, rope) == "not batch-invariant: row 0 alone differs"


def test_cached_attention_check_with_grouped_kv_heads():
    torch.manual_seed(0)
    sweep = cs.Sweep(cs.AttentionShape(4, 2, 16), budget_s=60, dtype=torch.float32, device="cpu")
    assert sweep.check(32, (16, 16, 4, 2, 2), start=480)
    assert sweep.errors["T=32 (16, 16, 4, 2, 2)"] < 1e-4


def test_cached_attention_recommend_weighs_microseconds_not_ratios():
    """A config 2 us slower at start 0 but 15 us faster at start 2000 wins (the ratio rule would pick the other);
    a config missing at one start is never chosen; no common config: None."""
    a, b, c = (64, 64, 4, 2, 1), (64, 32, 4, 2, 8), (16, 64, 4, 2, 2)
    cfg, worst_ratio = cs.recommend({0: {a: 4.0, b: 6.0}, 2000: {a: 60.0, b: 45.0}})
    assert cfg == b
    assert worst_ratio == pytest.approx(1.5)
    assert cs.recommend({0: {a: 4.0, b: 6.0, c: 3.0}, 2000: {a: 60.0, b: 45.0}})[0] == b
    assert cs.recommend({0: {a: 1.0}, 480: {b: 2.0}}) == (None, float("inf"))


class _FakeBench:
    """Times from a table: (64, 128) is fastest at one program per SM and slow at two; (64, 64) is in between."""

    failed: dict = {}
    skipped = 0
    shape = cs.AttentionShape(32, 32, 128)
    sms = 132

    def __init__(self, times):
        self.times, self.asked = times, []

    def measure(self, tokens, cfg, start, check_start, share=1.0):
        self.asked.append(cfg)
        return self.times.get(cfg[:2], {}).get(cfg[4], 99.0)


def test_cached_attention_tiles_ranked_by_their_faster_grid():
    """96 tokens, 64-row tiles on 132 SMs: 2 splits is about one program per SM, 4 about two; the tiles slow at two
    programs per SM but the fastest at one rank first (at two programs per SM alone, (64, 64) would)."""
    assert cs.wave_splits(96, 64, 32, 132) == [2, 4]
    assert cs.wave_splits(4096, 16, 32, 132) == [1]  # one split whatever the programs per SM: measured once
    bench = _FakeBench({(64, 128): {2: 26.5, 4: 37.0}, (64, 64): {2: 31.0, 4: 28.2}})
    tiles = cs.phase_tiles(bench, 96, 2000)
    assert all(t[:2] == (64, 128) for t in tiles)  # its four warp/stage variants tie at 26.5 us
    assert (64, 128, 4, 3, 2) in bench.asked and (64, 128, 4, 3, 4) in bench.asked
    assert len(tiles) == cs.TOP_TILES and len(set(tiles)) == len(tiles)


def test_gemv_norm_variants_pass_the_check_and_a_wrong_one_is_refused(monkeypatch):
    """The GEMV sweep times a fused kind with the norm folded in, and the norm kernel + the kind apart, only after
    each matches the fp32 reference of rmsnorm(x + residual) * g through the kind; a folded kernel that gets the
    norm wrong is refused (and recorded), while the kind without the norm still passes."""
    from hybrid_engine.kernels import gemv
    from hybrid_engine.kernels.sweeps import gemv_sweep as gs

    monkeypatch.setattr(gs, "graph_us", lambda fn: (fn(0), 1.0)[1])  # run once, no timing on the CPU
    cfg = (2, 32, 1, 1)
    for shape in (ds.GemmShape("gate_up", 2 * 24, 40), ds.GemmShape("qkv", (2 + 2 * 1) * 16, 40, (2, 1, 16))):
        bench = gs.GpuGemvBench(shape, torch.float32, "cpu")
        assert (bench.time(cfg), bench.time_norm(cfg), bench.apart_us(cfg)) == (1.0, 1.0, 1.0), bench.failed
    real = gemv.gemv_silu_triton

    def norm_ignored(x, w, config=None, norm=None):  # folds the residual add but forgets 1 / rms and the weight
        return real(x, w, config) if norm is None else (real(x + norm[0], w, config), x + norm[0])

    monkeypatch.setattr(gemv, "gemv_silu_triton", norm_ignored)
    bench = gs.GpuGemvBench(ds.GemmShape("gate_up", 2 * 24, 40), torch.float32, "cpu")
    assert bench.time(cfg) == 1.0 and bench.time_norm(cfg) is None
    assert "max abs error" in bench.failed[f"{cfg} norm folded"]
