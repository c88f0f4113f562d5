"""The whole engine on the Triton backend (the GPU default), run by the interpreter on the CPU: greedy tokens equal
transformers' on the same weights, so the fused prefill (rope + KV store + attention in one kernel, head_dim 32),
the last-row-only final layer and the decode kernels compose correctly end to end."""
import pytest
import torch
from block_helpers import blocks_settled
from transformers import AutoModelForCausalLM, LlamaConfig

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.models.presets import fill_random_


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_triton_backend_greedy_parity_with_transformers(kv_heads):
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=kv_heads, head_dim=32, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    fill_random_(model, 0.08, seed=1)
    llm = LLM(model, attention_backend="triton", dtype="float32", device="cpu", max_model_len=64)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for n in (1, 9, 20):
        ids = [(7 * i + 3) % 250 + 3 for i in range(n)]
        want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                              attention_mask=torch.ones(1, n, dtype=torch.long))[0, n:].tolist()
        assert llm.generate({"prompt_token_ids": ids}, sp)[0].outputs[0].token_ids == want, n
    assert blocks_settled(llm)


def test_decode_gemm_with_the_norm_folded_in_keeps_greedy_parity(monkeypatch, request):
    """$HYBRID_ENGINE_DECODE_GEMM_NORM=1 with the decode GEMM's kernels running (the interpreter standing in for the
    card): every decode step folds both RMSNorms into QKV + rope and gate/up + SiLU-mul, and the greedy tokens still
    equal transformers'."""
    from hybrid_engine.kernels import decode_gemm as dg

    calls = []
    fold = dg.decode_norm_linear_silu_mul

    def counted(*args):
        out = fold(*args)
        calls.append(out is not None)
        return out

    request.addfinalizer(dg.fold_norm_mode.cache_clear)  # later readers see the environment restored
    monkeypatch.setenv("HYBRID_ENGINE_DECODE_GEMM_NORM", "1")
    dg.fold_norm_mode.cache_clear()
    monkeypatch.setattr(dg, "_kernel_ok", lambda x, w, b: x.dtype == w.dtype)
    monkeypatch.setattr(dg, "decode_norm_linear_silu_mul", counted)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    fill_random_(model, 0.08, seed=1)
    llm = LLM(model, attention_backend="triton", dtype="float32", device="cpu", max_model_len=64, capture="off")
    assert llm.config.batch_invariant
    ids = [(7 * i + 3) % 250 + 3 for i in range(9)]
    want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                          attention_mask=torch.ones(1, 9, dtype=torch.long))[0, 9:].tolist()
    got = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert got[0].outputs[0].token_ids == want
    assert calls and all(calls)  # 5 decode steps x 2 layers, every one folded
    assert blocks_settled(llm)
