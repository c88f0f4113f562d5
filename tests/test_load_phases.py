"""Load: where its time goes (LLM.load_phases_s), and the warm-up marker, named by what decides the kernel set a
load compiles (runtime/rank.warm_up_material). A load finding its marker in Triton's cache skips the parallel
compile pass; the material must change with everything that changes the kernel variants, and not with the compile
thread count."""
from types import SimpleNamespace

import pytest
import torch

from hybrid_engine.config import EngineConfig
from hybrid_engine.models.llama import ModelArgs
from hybrid_engine.runtime import rank


@pytest.fixture
def fake_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake Card")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for key in ("HYBRID_ENGINE_PDL", "HYBRID_ENGINE_COMPILE_WORKERS"):
        monkeypatch.delenv(key, raising=False)


def _model(hidden: int = 64, dtype: torch.dtype = torch.float16):
    args = ModelArgs(vocab_size=300, hidden_size=hidden, intermediate_size=3 * hidden, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=hidden // 4, rms_norm_eps=1e-5, qkv_bias=False,
                     tie_word_embeddings=False, max_position_embeddings=1024)
    return SimpleNamespace(args=args, embed_tokens=SimpleNamespace(weight=torch.zeros(1, dtype=dtype)))


def _material(cfg=None, model=None, rows=(1, 2, 4), max_model_len=256):
    return rank.warm_up_material(cfg or EngineConfig(), model or _model(), rows, max_model_len,
                                 torch.device("cuda", 0))


def test_same_load_same_material(fake_card):
    assert _material() == _material()


@pytest.mark.parametrize("change", ["rows", "model", "dtype", "max_model_len", "config", "pdl"])
def test_what_changes_the_kernels_changes_the_material(fake_card, monkeypatch, change):
    base = _material()
    if change == "rows":
        other = _material(rows=(1, 2, 4, 8))
    elif change == "model":
        other = _material(model=_model(hidden=128))
    elif change == "dtype":
        other = _material(model=_model(dtype=torch.bfloat16))
    elif change == "max_model_len":
        other = _material(max_model_len=512)
    elif change == "config":
        other = _material(cfg=EngineConfig(batch_invariant=False))
    else:
        monkeypatch.setenv("HYBRID_ENGINE_PDL", "0")
        other = _material()
    assert other != base


def test_compile_threads_do_not_change_the_material(fake_card, monkeypatch):
    base = _material()
    monkeypatch.setenv("HYBRID_ENGINE_COMPILE_WORKERS", "3")
    assert _material() == base


def test_marker_written_best_effort(tmp_path):
    marker = tmp_path / "warm" / "abc"
    rank._touch(marker)
    assert marker.exists()
    blocked = tmp_path / "file"
    blocked.write_text("")
    rank._touch(blocked / "sub" / "abc")  # a file where the directory should be: no error, no marker
    assert not (blocked / "sub" / "abc").exists()


def test_llm_reports_its_load_phases():
    from hybrid_engine import LLM

    llm = LLM("tiny-llama", device="cpu")
    try:
        phases = llm.load_phases_s
        # no warm-up or graphs on the CPU; the model phase's parts as the loader timed them
        assert list(phases) == ["model", "model.tokenizer", "model.weights", "model.config", "kv_and_runner"]
        assert all(v >= 0 for v in phases.values())
        assert phases["model.tokenizer"] + phases["model.weights"] + phases["model.config"] <= phases["model"] + 0.01
    finally:
        llm.close()


def test_checkpoint_load_reports_weights_and_tokenizer(tmp_path, monkeypatch):
    from hybrid_engine import LLM
    from hybrid_engine.models import loader
    from hybrid_engine.models.presets import build_hf_model

    model, tokenizer = build_hf_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), device="cpu")  # the config read without transformers, which loads on a thread
    try:
        assert {"model.config", "model.weights", "transformers_wait"} <= set(llm.load_phases_s)
    finally:
        llm.close()
    monkeypatch.setattr(loader, "read_light_config", lambda path: None)  # transformers first, one step at a time
    llm = LLM(str(tmp_path), device="cpu")
    try:
        assert {"model.config", "model.weights", "model.tokenizer"} <= set(llm.load_phases_s)
        assert "transformers_wait" not in llm.load_phases_s
    finally:
        llm.close()


def test_warm_up_without_the_graph_plan_pass_runs_the_jit_variants_only():
    """graph_plan=False (a warm Triton cache, or no graphs): the JIT plan's prefill lengths, prefix-cache cases and
    decode rows still run once; the graph plan's pass is left to the captures' own warm-up runs."""
    from hybrid_engine import LLM
    from hybrid_engine.kernels import gemm

    llm = LLM("tiny-llama", device="cpu")
    runner = llm._rank_runner
    seen = []
    prefill, decode = runner.prefill_step, runner.decode_step
    runner.prefill_step = lambda n, *a, **k: (seen.append(("prefill", n, gemm.in_graph_plan())), prefill(n, *a, **k))
    runner.decode_step = lambda rows, *a, **k: (seen.append(("decode", rows, gemm.in_graph_plan())), decode(rows, *a, **k))
    try:
        runner.warm_up(decode_rows=(1, 2))
        both = list(seen)
        seen.clear()
        runner.warm_up(decode_rows=(1, 2), graph_plan=False)
        assert seen and len(seen) < len(both)
        assert set(seen) == {s for s in both if s[2] == seen[0][2]}  # exactly the first (JIT) pass
        assert {("decode", 1), ("decode", 2)} <= {s[:2] for s in seen}
    finally:
        llm.close()
