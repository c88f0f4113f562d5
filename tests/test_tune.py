"""`hybrid-engine tune` without a GPU: the CLI refuses with one line, and the sweep orchestration, run with fake
benches instead of CUDA timings, saves each choice where the kernels read it (family and key) and keeps what was
finished when the time limit cuts a sweep short."""
from __future__ import annotations

import json

import pytest
import torch

from hybrid_engine import cli
from hybrid_engine.kernels import cached_prefill_attention as cpa
from hybrid_engine.kernels import decode_gemm, gemm, gemv, tuning
from hybrid_engine.kernels.sweeps import tune as tune_mod
from hybrid_engine.kernels.sweeps.decode_gemm_sweep import (MS, RULE_MS, GemmShape, fits_smem, rule_score,
                                                            stage1_configs, sweep_shape)
from hybrid_engine.models.shapes import model_shapes

CARD = "NVIDIA Test Card"
PLAIN_BEST = (32, 128, 1, 4, 4, 0)  # the fake's fastest plain decode GEMM config, reached in stage 2
FUSED_BEST = (32, 128, 1, 4, 3, 0)  # the fused variants find PLAIN_BEST slow: the next plain finalist wins
ATTENTION_BEST = {32: (16, 128, 4, 3, 8), 96: (64, 64, 4, 3, 2), 144: (64, 64, 4, 2, 4), 256: (64, 64, 4, 2, 2),
                  512: (64, 64, 4, 2, 1)}


def _gemm_cost(kind: str, cfg: tuple[int, ...], fastest: tuple[int, ...] = PLAIN_BEST) -> float:
    """Grows with the distance of cfg from `fastest`; the fused variants find PLAIN_BEST slow."""
    bn, bk, split, warps, stages, swap = cfg
    f_bn, f_bk, f_split, f_warps, f_stages, f_swap = fastest
    cost = 10 + abs(bn - f_bn) / 16 * 1.5 + abs(bk - f_bk) / 64 * 1.3 + abs(split - f_split) * 1.7
    cost += abs(warps - f_warps) / 4 * 1.9 + abs(stages - f_stages) * 1.1 + (swap != f_swap) * 2
    return cost + (5 if kind in ("rope", "silu") and cfg == PLAIN_BEST else 0)


class FakeGemmBench:
    """`ShapeBench` without CUDA: us per call from `_gemm_cost`; `skip_all` plays a bench past its deadline."""

    made: list[str] = []
    fastest = PLAIN_BEST

    def __init__(self, shape, dtype, deadline, skip_all=False):
        self.shape, self.times, self.failed, self.skipped, self.skip_all = shape, {}, {}, 0, skip_all
        FakeGemmBench.made.append(shape.name)

    def baselines(self):
        self.times["cublas"] = {"F.linear": {m: 50.0 + m for m in MS}}

    def time(self, kind, cfg, ms=RULE_MS, known_bad=None):
        if self.skip_all:
            self.skipped += 1
            return None
        per_m = self.times.setdefault(kind, {}).setdefault(str(cfg), {})
        per_m.update({m: _gemm_cost(kind, cfg, self.fastest) * (1 + m / 32) for m in ms})
        return rule_score(per_m)


GEMV_BEST = {"plain": (4, 64, 4, 1), "gate_up": (2, 64, 4, 1), "qkv": (1, 64, 4, 1)}  # tiny-llama's K = 64
FOLDED_BEST = {"gate_up": (8, 64, 4, 1), "qkv": (4, 64, 4, 1)}  # with the norm folded in: taller tiles


class FakeGemvBench:
    """`GpuGemvBench` without CUDA: us grows with the distance from GEMV_BEST[kind]; cuBLAS takes 20 us, except on
    the LM head (512 x 64), where it takes 5 and wins."""

    def __init__(self, shape, dtype, deadline):
        from hybrid_engine.kernels.sweeps.gemv_sweep import kind_of

        self.shape, self.kind, self.failed, self.skipped = shape, kind_of(shape), {}, 0

    def cublas_us(self):
        return None if self.kind != "plain" else 5.0 if self.shape.n == 512 else 20.0

    def time(self, cfg):
        best = GEMV_BEST[self.kind]
        return 8.0 + sum(abs(a - b) / max(a, b) for a, b in zip(cfg, best))

    def time_norm(self, cfg):
        """The norm folded in: fastest on FOLDED_BEST, 9 us there."""
        return 9.0 + sum(abs(a - b) / max(a, b) for a, b in zip(cfg, FOLDED_BEST[self.kind]))

    def apart_us(self, cfg):
        """Norm kernel + the kernel: 12 us for gate/up (folding wins), 8.5 us for QKV (apart wins)."""
        return 12.0 if self.kind == "gate_up" else 8.5


class FakeAttentionBench:
    """`Sweep` without CUDA: the fastest config of each token count is ATTENTION_BEST's, at every start."""

    def __init__(self, shape, dtype, budget_s):
        self.shape, self.failed, self.skipped, self.sms = shape, {}, 0, 132

    def fixed_configs(self, tokens):
        return {"unsplit (before)": (64, 64, 4, 2, 1), "cached_config": (16, 64, 4, 2, 8)}

    def measure(self, tokens, cfg, start, check_start, share=1.0):
        best = ATTENTION_BEST[tokens]
        return 5.0 + start / 1000 + sum(abs(a - b) / max(a, b) for a, b in zip(cfg, best))


class FakePrefillBench:
    """`GpuPrefillGemmBench` without CUDA: cuBLAS 30 us; the decode GEMM 20 us (it wins at M <= 32); cuBLASLt 28 us
    from M = 64 on (wins there by more than the margin); cuBLAS on the transposed copy 29.8 us (within the margin:
    never chosen); Triton configs 40 us."""

    def __init__(self, shape, dtype, deadline):
        self.failed, self.skipped = {}, 0

    def measure(self, choice, m):
        if choice == "decode_gemm":
            return 20.0
        if choice == "lt":
            return 28.0 if m >= 64 else 31.0
        return {"cublas": 30.0, "t": 29.8, "t_lt": 31.0}.get(choice, 40.0)


@pytest.fixture()
def card(tmp_path, monkeypatch):
    """An empty user cache and package folder, a CUDA device name for the lookups, and fresh lookup caches."""
    monkeypatch.setenv("HYBRID_ENGINE_TUNING_DIR", str(tmp_path / "user"))
    monkeypatch.setattr(tuning, "PACKAGE_DIR", tmp_path / "package")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: CARD)
    FakeGemmBench.made = []

    def clear():
        tuning._tables.cache_clear()
        decode_gemm._config.cache_clear()
        gemv.config_for.cache_clear()
        gemv.norm_config_for.cache_clear()
        cpa.tuned_configs.cache_clear()
        gemm.tuned_plan.cache_clear()

    clear()
    yield tmp_path / "user" / "nvidia-test-card.json"
    clear()


def _run(**kw) -> tune_mod.TuneRun:
    return tune_mod.TuneRun(CARD, gemm_bench=kw.pop("gemm_bench", FakeGemmBench), attention_bench=FakeAttentionBench,
                            gemv_bench=FakeGemvBench, prefill_bench=FakePrefillBench, **kw)


def test_choices_are_saved_where_the_kernels_read_them(card):
    shapes = model_shapes("tiny-llama")
    run = _run(budget_s=60)
    rows = tune_mod.tune(shapes, tune_mod.KERNELS, run)
    assert run.saved_to == card
    assert [(r.family, r.label, r.note) for r in rows if r.note] == [
        ("gemv_rope_norm", "qkv 128x64", "the norm apart is faster: saved as an empty entry"),
        ("gemv", "lm_head 512x64", "cuBLAS is faster: saved as an empty entry")]
    table = json.loads(card.read_text())["tables"]
    # qkv: head_dim 16 has a rotary half of 8 columns, which no BLOCK_N (>= 16) divides: no config fuses rope + KV
    # store, the model composes the unfused ops, and the plain sum chooses
    assert table["decode_gemm"] == {"128,64,float16": list(PLAIN_BEST), "64,64,float16": list(PLAIN_BEST),
                                    "352,64,float16": list(FUSED_BEST), "64,176,float16": list(PLAIN_BEST),
                                    "512,64,float16": list(PLAIN_BEST)}
    assert table["cached_attention"] == {f"{t},4,16,float16": list(c) for t, c in ATTENTION_BEST.items()}
    # the one-row GEMVs: qkv's head_dim 16 gives the rope variant (BLOCK_J divides the rotary half 8); the LM head
    # keeps cuBLAS (an empty entry)
    assert table["gemv"] == {"64,64,float16": list(GEMV_BEST["plain"]), "64,176,float16": [4, 256, 4, 1],
                             "512,64,float16": []}
    assert table["gemv_silu"] == {"352,64,float16": list(GEMV_BEST["gate_up"])}
    assert table["gemv_rope"] == {"128,64,float16": list(GEMV_BEST["qkv"])}
    # with the norm folded in: gate/up folds on its own taller tile; QKV keeps the norm apart (an empty entry)
    assert table["gemv_silu_norm"] == {"352,64,float16": list(FOLDED_BEST["gate_up"])}
    assert table["gemv_rope_norm"] == {"128,64,float16": []}
    cuda = torch.device("cuda")
    assert gemv.norm_config_for("gate_up", 352, 64, cuda, torch.float16) == FOLDED_BEST["gate_up"]
    assert gemv.norm_config_for("qkv", 128, 64, cuda, torch.float16) is None
    folded = next(r for r in rows if r.family == "gemv_silu_norm")
    assert folded.us == {1: 9.0} and folded.baseline_us == {1: 12.0}
    assert gemv.config_for("plain", 64, 64, cuda, torch.float16) == GEMV_BEST["plain"]
    assert gemv.config_for("plain", 512, 64, cuda, torch.float16) is None  # cuBLAS
    assert gemv.config_for("gate_up", 352, 64, cuda, torch.float16) == GEMV_BEST["gate_up"]
    assert gemv.config_for("plain", 64, 64, cuda, torch.bfloat16) == gemv.default_config(64)  # float16 only
    assert decode_gemm.config_for(352, 64, cuda, torch.float16) == FUSED_BEST  # gate/up: the fused variant's sum
    assert decode_gemm.config_for(64, 176, cuda, torch.float16) == PLAIN_BEST
    assert decode_gemm.config_for(64, 176, cuda, torch.bfloat16) != PLAIN_BEST  # measured for float16 only
    assert cpa.cached_config(130, 4096, 4, cuda, 16, torch.float16) == ATTENTION_BEST[144]
    assert cpa.cached_config(32, 4096, 4, cuda, 16, torch.float16) == ATTENTION_BEST[32]
    gate_up = next(r for r in rows if r.family == "decode_gemm" and r.label == "gate_up 352x64")
    assert gate_up.us == {m: _gemm_cost("silu", FUSED_BEST) * (1 + m / 32) for m in RULE_MS}
    assert gate_up.baseline_us == {m: 50.0 + m for m in RULE_MS}
    # the prefill plan: the four projections (not the LM head), decode GEMM to 32 rows, cuBLAS to 48, then cuBLASLt
    plan = [[32, "decode_gemm"], [48, "cublas"], [512, "lt"]]
    assert table["prefill_gemm"] == {key: plan for key in ("128,64,float16", "64,64,float16", "352,64,float16",
                                                           "64,176,float16")}
    with gemm.graph_plan():
        assert gemm.config_for(20, 352, 64, transposed=True, device=cuda) == "decode_gemm"
        assert gemm.config_for(40, 352, 64, transposed=True, device=cuda) is None
        assert gemm.config_for(100, 352, 64, transposed=True, device=cuda) == "lt"
        assert gemm.config_for(100, 352, 64, transposed=True, device=cuda, dtype=torch.bfloat16) is None
    assert {31, 32, 512} <= gemm.warm_up_lengths(cuda)  # the decode GEMM in both specialisations; lt's bias


def test_one_family_and_an_explicit_out_file(card, tmp_path):
    out = tmp_path / "shipped.json"
    run = _run(out=out)
    rows = tune_mod.tune(model_shapes("llama-2-7b-shape", 2, "bfloat16"), ("cached_attention",), run)
    assert run.saved_to == out and not card.exists()
    assert [r.family for r in rows] == ["cached_attention"] * len(ATTENTION_BEST)
    saved = json.loads(out.read_text())
    assert saved["device"] == CARD and "decode_gemm" not in saved["tables"]
    assert saved["tables"]["cached_attention"]["256,16,128,bfloat16"] == list(ATTENTION_BEST[256])


def test_a_time_limit_keeps_the_shapes_finished_before_it(card):
    def bench(shape, dtype, deadline):
        return FakeGemmBench(shape, dtype, deadline, skip_all=shape.name == "gate_up")

    rows = tune_mod.tune(model_shapes("tiny-llama", dtype="bfloat16"), ("decode_gemm",), _run(gemm_bench=bench))
    saved = json.loads(card.read_text())["tables"]["decode_gemm"]
    assert set(saved) == {"128,64,bfloat16", "64,64,bfloat16", "64,176,bfloat16", "512,64,bfloat16"}
    gate_up = rows[2]
    assert gate_up.config is None and "time limit" in gate_up.note and "not saved" in gate_up.note


def test_a_spent_budget_makes_no_bench(card):
    rows = tune_mod.tune(model_shapes("tiny-llama"), ("decode_gemm",), _run(budget_s=1e-9))
    assert FakeGemmBench.made == [] and all(r.note == "time limit reached before it started" for r in rows)
    assert not card.exists()


def test_stage1_holds_swap_configs_that_fit_shared_memory():
    """SWAP=1 tiles (BLOCK_N 64/128 x BLOCK_K 64..256) are searched from stage 1 at the most of 4 / 3 / 2 stages
    that fit; a tile that fits at none (BLOCK_N 128 x BLOCK_K 256) is left out, and SWAP=0 keeps its grid."""
    configs = stage1_configs(4096, 4096, quick=False, sms=132)
    swap = {(bn, bk): ns for bn, bk, _, _, ns, sw in configs if sw}
    assert swap == {(64, 64): 4, (64, 128): 4, (64, 256): 2, (128, 64): 4, (128, 128): 2}
    assert not fits_smem(128, 256, 2) and not fits_smem(128, 128, 3) and fits_smem(64, 128, 4)
    grid = {(bn, bk) for bn in (16, 32, 64) for bk in (64, 128, 256, 512) if fits_smem(bn, bk, 3)}
    assert {(bn, bk) for bn, bk, *_, sw in configs if not sw} == grid
    assert all(fits_smem(bn, bk, ns) and warps == 4 for bn, bk, _, warps, ns, _ in configs)
    assert (128, 128, 8, 4, 2, 1) in configs and (128, 128, 2, 4, 2, 1) not in configs  # 64 programs < 132 SMs


def test_the_rule_puts_batch_one_first():
    """A config 2 us faster at M = 1 wins over one 3 us faster at M = 8 and at M = 32 (a plain sum would pick the
    second); Ms outside the rule do not count."""
    batch_one = {1: 25.0, 8: 28.0, 32: 36.0, 16: 99.0}
    batches = {1: 27.0, 8: 25.0, 32: 33.0}
    assert rule_score(batch_one) == 25.0 + (28.0 + 36.0) / 4
    assert rule_score(batch_one) < rule_score(batches) and sum(batch_one[m] for m in RULE_MS) > sum(batches.values())


class SwapFastestBench(FakeGemmBench):
    """A fake where a BLOCK_N 128 swap config is fastest; its rope variant refuses BLOCK_N past the rotary half, as
    `decode_rope_store_triton` does."""

    fastest = (128, 128, 8, 4, 2, 1)

    def time(self, kind, cfg, ms=RULE_MS, known_bad=None):
        if kind.startswith("rope") and (self.shape.heads[2] // 2) % cfg[0]:
            self.failed[f"{kind} {cfg}"] = "ValueError: rotary half not divisible by BLOCK_N"
            return None
        return super().time(kind, cfg, ms, known_bad)


def test_a_fastest_swap_config_is_recommended():
    """Plain shapes get the fastest swap config; QKV with head_dim 128 (rotary half 64) gets the fastest config its
    fused rope + KV store runs, a BLOCK_N 64 swap one, not a plain config the model could not fuse."""
    o = sweep_shape(SwapFastestBench(GemmShape("o", 4096, 4096), torch.float16, None))
    assert o["chosen"] == SwapFastestBench.fastest
    qkv = sweep_shape(SwapFastestBench(GemmShape("qkv", 12288, 4096, (32, 32, 128)), torch.float16, None))
    assert qkv["plain_best"] == SwapFastestBench.fastest
    assert qkv["fused"] == "rope" and qkv["chosen"][0] == 64 and qkv["chosen"][5] == 1


def test_unknown_kernels_are_named():
    with pytest.raises(ValueError, match=r"kernels=\['flash'\]: choose one or more of"):
        tune_mod.tune(model_shapes("tiny-llama"), ("flash",), _run())


# --- The CLI ----------------------------------------------------------------------------------------------------------

def _one_error_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    return lines[0]


def test_without_cuda_the_cli_says_a_gpu_is_needed(capsys, monkeypatch, card):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _one_error_line(capsys, cli.main(["tune", "--model", "tiny-llama"]))
    assert "needs a CUDA GPU" in line
    assert not card.exists()


@pytest.mark.parametrize(("args", "named"), [
    (["--kernels", "decode_gemm,flash"], "--kernels='decode_gemm,flash': choose one or more of gemv, decode_gemm, "
                                         "prefill_gemm, cached_attention"),
    (["--budget-s", "0"], "--budget-s=0.0: must be a number of seconds > 0"),
    (["--dtype", "float32"], "argument --dtype: invalid choice: 'float32'"),
    (["--tensor-parallel-size", "3"], "--tensor-parallel-size=3 must divide the model's num_attention_heads=4"),
])
def test_bad_flags_are_one_line(capsys, monkeypatch, args, named):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the flags are checked before anything runs
    line = _one_error_line(capsys, cli.main(["tune", "--model", "tiny-llama", *args]))
    assert named in line


def test_the_cli_tunes_saves_and_prints_the_table(capsys, monkeypatch, card):
    from hybrid_engine.kernels import _workspace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_workspace, "sm_count", lambda device: 132)
    monkeypatch.setattr(tune_mod, "default_workers", lambda: 0)
    monkeypatch.setattr(tune_mod, "ShapeBench", lambda shape, dtype, device, deadline: FakeGemmBench(shape, dtype,
                                                                                                     deadline))
    monkeypatch.setattr(tune_mod, "Sweep", lambda shape, budget, dtype: FakeAttentionBench(shape, dtype, budget))
    monkeypatch.setattr(tune_mod, "GpuGemvBench", lambda shape, dtype, device, deadline: FakeGemvBench(shape, dtype,
                                                                                                       deadline))
    monkeypatch.setattr(tune_mod, "GpuPrefillGemmBench",
                        lambda n, k, transposed, dtype, deadline: FakePrefillBench(None, dtype, deadline))
    assert cli.main(["tune", "--model", "tiny-llama", "--quick"]) == 0
    out, err = capsys.readouterr()
    assert f"wrote {card}" in err and card.exists()
    lines = out.splitlines()
    gate_up = next(ln for ln in lines if "gate_up 352x64" in ln and ln.startswith("decode_gemm"))
    assert str(FUSED_BEST) in gate_up and "M 1/8/32:" in gate_up and "cuBLAS 51.0/58.0/82.0" in gate_up
    assert sum("cached_attention" in ln for ln in lines) == len(ATTENTION_BEST)
    prefill = [ln for ln in lines if ln.startswith("prefill_gemm")]
    assert len(prefill) == 4 and "(32, 'decode_gemm')" in prefill[0] and "cuBLAS 30.0/" in prefill[0]


def test_out_as_a_folder_writes_the_card_s_file_in_it(tmp_path):
    from hybrid_engine.tune_cli import _out_path

    assert _out_path(tmp_path, CARD) == tmp_path / "nvidia-test-card.json"
    assert _out_path(tmp_path / "t.json", CARD) == tmp_path / "t.json"
    assert _out_path(None, CARD) is None


def test_gemv_candidates_and_rule():
    from hybrid_engine.kernels.sweeps.gemv_sweep import candidates, sweep_gemv

    plain = candidates(GemmShape("o", 4096, 4096))
    assert {bk for _, bk, _, _ in plain} == {512, 1024, 2048, 4096}
    assert all(bn * bk >= 4096 for bn, bk, w, _ in plain if w == 8) and (4, 2048, 4, 1) in plain
    assert {bk for _, bk, _, _ in candidates(GemmShape("down", 576, 100))} == {128}  # capped at K's power of two
    qkv = candidates(GemmShape("qkv", 960, 576, (9, 3, 64)))
    assert {bj for bj, *_ in qkv} == {1, 2, 4} and {bk for _, bk, _, _ in qkv} == {512, 1024}
    folded = candidates(GemmShape("qkv", 960, 576, (9, 3, 64)), norm=True)  # taller tiles with the norm folded in
    assert {bj for bj, *_ in folded} == {1, 2, 4, 8, 16}
    assert {bj for bj, *_ in candidates(GemmShape("qkv", 448, 64, (4, 2, 16)), norm=True)} == {1, 2, 4, 8}

    class Bench:
        def __init__(self, shape, cublas):
            self.shape, self.failed, self.skipped, self._cublas = shape, {}, 0, cublas

        def cublas_us(self):
            return self._cublas

        def time(self, cfg):
            return 10.0 + cfg[0] + cfg[1] / 1024  # fewest rows and the shortest K step are fastest

    fast_cublas = sweep_gemv(Bench(GemmShape("o", 4096, 4096), 5.0), None)
    assert fast_cublas["chosen"] == () and fast_cublas["gemv_best"] == (2, 512, 4, 1)
    slow_cublas = sweep_gemv(Bench(GemmShape("o", 4096, 4096), 50.0), None)
    assert slow_cublas == {"chosen": (2, 512, 4, 1), "us": 12.5, "baseline_us": 50.0}
    fused = sweep_gemv(Bench(GemmShape("gate_up", 8192, 4096), None), (3, 4096, 8, 1))  # `before`: not a candidate
    assert fused["chosen"] == (1, 512, 4, 1) and fused["baseline_us"] == 10.0 + 3 + 4
