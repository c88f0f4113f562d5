"""The card-keyed prefill projection plan: the sweep's rule (kernels/sweeps/prefill_gemm_sweep.py), a tuning table's
plan read by `gemm.config_for` (with and without the weight's transposed copy, in and out of graph captures), its
validation, and the A/B switch back to the built-in tables. No CUDA: a fake card name and a table file."""
from __future__ import annotations

import json

import pytest
import torch

from hybrid_engine.kernels import gemm, tuning
from hybrid_engine.kernels.sweeps import prefill_gemm_sweep as pgs

CARD = "NVIDIA Plan Card"
CUDA = torch.device("cuda")


def test_rule_picks_the_fastest_past_the_margin_and_merges_ranges():
    times = {16: {"cublas": 10.0, "lt": 9.9, "decode_gemm": 8.0},   # decode GEMM: 20 % faster
             32: {"cublas": 10.0, "decode_gemm": 8.5},
             48: {"cublas": 10.0, "triton:64,64,128,4,4": 9.9},    # 1 %: within the margin, cuBLAS
             64: {"cublas": 10.0, "t": 9.0, "t_lt": 9.5},
             80: {"lt": 5.0},                                       # cuBLAS not timed: left to the next range
             96: {"cublas": 10.0, "triton:64,64,128,4,4": 7.0},
             112: {"cublas": 10.0, "lt": 10.0}}                     # trailing cuBLAS: dropped
    assert pgs.plan_from(times) == [[32, "decode_gemm"], [48, "cublas"], [64, "t"], [96, [64, 64, 128, 4, 4]]]
    assert pgs.plan_from({16: {"cublas": 1.0, "lt": 2.0}}) == []  # cuBLAS everywhere: an empty plan


def test_sweep_times_the_candidates_of_each_length():
    seen = []

    class Bench:
        failed, skipped = {}, 0

        def measure(self, choice, m):
            seen.append((pgs.label(choice), m))
            return None if choice == "t_lt" else 1.0  # a failed choice is left out

    times = pgs.sweep_shape(Bench(), (16, 200), transposed=True)
    assert set(times[16]) == {"cublas", "lt", "t", "decode_gemm"} | {pgs.label(c) for c in pgs.TRITON_SMALL}
    assert "decode_gemm" not in times[200] and "triton:128,128,64,8,4" in times[200]
    assert ("t_lt", 16) in seen
    assert {c for c, m in seen if m == 16} - {"t", "t_lt"} == {pgs.label(c) for c in pgs.candidates(16, False)}
    assert pgs.parse("triton:16,64,128,4,4") == (16, 64, 128, 4, 4) and pgs.parse("lt") == "lt"


@pytest.fixture()
def card(tmp_path, monkeypatch):
    """A table for CARD in the user cache, and fresh lookup caches."""
    monkeypatch.setenv("HYBRID_ENGINE_TUNING_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "PACKAGE_DIR", tmp_path / "package")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: CARD)
    monkeypatch.delenv("HYBRID_ENGINE_PREFILL_PLAN", raising=False)

    def write(plans):
        (tmp_path / "nvidia-plan-card.json").write_text(json.dumps({"tables": {"prefill_gemm": plans}}))
        clear()

    def clear():
        tuning._tables.cache_clear()
        gemm.tuned_plan.cache_clear()
        gemm.use_tuned_plans.cache_clear()

    clear()
    yield write
    clear()


def test_the_card_s_plan_replaces_the_built_in_one(card, monkeypatch):
    monkeypatch.setitem(gemm.GEMM_CONFIGS, (40, 96), [(64, (16, 16, 16, 1, 1))])
    card({"40,96,float16": [[16, "decode_gemm"], [32, [16, 32, 32, 2, 2]], [64, "t"], [96, "t_lt"],
                            [128, "cublas"], [160, "lt"]]})
    with gemm.graph_plan():
        assert gemm.config_for(10, 40, 96, device=CUDA) == "decode_gemm"
        assert gemm.config_for(20, 40, 96, device=CUDA) == (16, 32, 32, 2, 2)
        assert gemm.config_for(40, 40, 96, transposed=True, device=CUDA) == "t"
        assert gemm.config_for(40, 40, 96, device=CUDA) is None  # no copy: cuBLAS on the weight itself
        assert gemm.config_for(80, 40, 96, transposed=True, device=CUDA) == "t_lt"
        assert gemm.config_for(80, 40, 96, device=CUDA) == "lt"
        assert gemm.config_for(100, 40, 96, device=CUDA) is None
        assert gemm.config_for(150, 40, 96, device=CUDA) == "lt"
        assert gemm.config_for(200, 40, 96, device=CUDA) is None  # past the plan
        assert gemm.config_for(20, 40, 96, device=CUDA, dtype=torch.bfloat16) == (16, 16, 16, 1, 1)  # not tuned
        assert gemm.config_for(20, 40, 96) == (16, 16, 16, 1, 1)  # no device: the built-in table
    # the JIT path: only cuBLAS on the copy, as with the built-in tables
    assert gemm.config_for(40, 40, 96, transposed=True, device=CUDA) == "t"
    assert gemm.config_for(80, 40, 96, transposed=True, device=CUDA) is None
    assert gemm.config_for(10, 40, 96, device=CUDA) is None
    assert {31, 32, 15, 16, 96, 160} <= gemm.warm_up_lengths(CUDA)  # both M specialisations, the zero biases
    monkeypatch.setenv("HYBRID_ENGINE_PREFILL_PLAN", "builtin")
    gemm.use_tuned_plans.cache_clear()
    gemm.tuned_plan.cache_clear()
    with gemm.graph_plan():
        assert gemm.config_for(10, 40, 96, device=CUDA) == (16, 16, 16, 1, 1)
    monkeypatch.setenv("HYBRID_ENGINE_PREFILL_PLAN", "fastest")
    gemm.use_tuned_plans.cache_clear()
    gemm.tuned_plan.cache_clear()
    with pytest.raises(ValueError, match="HYBRID_ENGINE_PREFILL_PLAN='fastest' must be 'tuned' or 'builtin'"):
        gemm.config_for(10, 40, 96, transposed=True, device=CUDA)


@pytest.mark.parametrize("bad", [[[16, "cudnn"]], [[64, "decode_gemm"]], [[32, "lt"], [16, "t"]], [[16, [16, 32]]],
                                 [["16", "lt"]]])
def test_a_malformed_plan_is_ignored_with_a_warning(card, caplog, bad):
    card({"40,96,float16": bad})
    with gemm.graph_plan(), caplog.at_level("WARNING"):
        assert gemm.tuned_plan(40, 96, CUDA, torch.float16) is None
        assert gemm.config_for(20, 40, 96, device=CUDA) is None
    assert "prefill_gemm 40,96,float16" in caplog.text and "must be [max_M, choice]" in caplog.text
