"""EngineConfig.prefill_weight_copy: the transposed QKV / gate-up copies, when they are made, that prefill reads
them where the plan says, and that greedy outputs stay what they were without them."""
import pytest
import torch

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.runtime import rank as engine_mod
from hybrid_engine.kernels import gemm

SP = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPT = {"prompt_token_ids": [(7 * i + 3) % 250 + 3 for i in range(21)]}


def _tokens(llm):
    return llm.generate(PROMPT, SP)[0].outputs[0].token_ids


def test_bad_value_names_it():
    with pytest.raises(ValueError, match=r"prefill_weight_copy='yes' is not allowed.*'auto', 'on', 'off'"):
        LLM("tiny-llama", prefill_weight_copy="yes")


def test_auto_makes_no_copy_on_cpu():
    llm = LLM("tiny-llama")
    assert llm.stats()["prefill_weight_copy_bytes"] == 0
    assert all(layer.qkv_proj.weight_t is None for layer in llm.model.layers)


def test_copy_is_read_by_prefill_and_keeps_greedy_tokens(monkeypatch):
    off = _tokens(LLM("tiny-llama", prefill_weight_copy="off"))
    llm = LLM("tiny-llama", prefill_weight_copy="on")
    layer = llm.model.layers[0]
    expected = sum(p.weight.numel() * p.weight.element_size()
                   for lyr in llm.model.layers for p in (lyr.qkv_proj, lyr.gate_up_proj))
    assert llm.stats()["prefill_weight_copy_bytes"] == expected > 0
    assert torch.equal(layer.qkv_proj.weight_t, layer.qkv_proj.weight.t())
    assert layer.gate_up_proj.weight_t.is_contiguous() and layer.gate_up_proj.weight_t.shape[0] == 64
    for proj in (layer.qkv_proj, layer.gate_up_proj):  # the tiny shapes are not in the measured table: plan them
        monkeypatch.setitem(gemm.GEMM_T_CONFIGS, tuple(proj.weight.shape), [(512, "t")])
    assert _tokens(llm) == off
    for lyr in llm.model.layers:  # prove the copies are what prefill read: spoil them and the output changes
        lyr.qkv_proj.weight_t.mul_(-1.0)
    assert _tokens(llm) != off


@pytest.mark.parametrize("free_gib,made", [(64.0, True), (0.0001, False)])
def test_auto_on_cuda_follows_free_memory(monkeypatch, free_gib, made):
    """The auto policy (exercised without a GPU: mem_get_info patched, the tensors stay on the CPU)."""
    llm = LLM("tiny-llama", prefill_weight_copy="off")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 80 * 2**30))
    added = engine_mod._prefill_weight_copies("auto", llm.model, torch.device("cuda"))
    assert (added > 0) == made
    assert (llm.model.layers[0].gate_up_proj.weight_t is not None) == made
