"""The JIT path's lean prefill loop (models/llama_jit.py) computes exactly what LlamaModel.forward computes: the same
last-row hidden state and the same KV-cache contents, for 4 layers (so later layers re-issue the first layer's
launches with their own weights and caches), with and without a QKV bias, GQA; and it steps aside where it does not
apply."""
import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.kernels import gemm
from hybrid_engine.models.llama import AttentionMetadata
from hybrid_engine.models import llama_jit
from hybrid_engine.models.llama_jit import jit_prefill, warm_projections
from hybrid_engine.models.presets import fill_random_


def _llm(qkv_bias: bool, device: str, dtype: str, backend: str = "triton", max_model_len: int = 64):
    from transformers import AutoModelForCausalLM

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = Qwen2Config(**kw) if qkv_bias else LlamaConfig(head_dim=32, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    fill_random_(model, 0.08, seed=1)
    return LLM(model, attention_backend=backend, dtype=dtype, device=device, max_model_len=max_model_len,
               capture="off")


def _staged(llm, n: int):
    """Stage an n-token prompt in the runner's buffers; (ids, positions, meta, blocks) as prefill_step builds them
    (its first launch computes the cache slots from the staged block table)."""
    r = llm.runner
    allocator = llm.scheduler.blocks.allocator
    blocks = allocator.allocate(llm.scheduler.blocks.blocks_for(n + 1))
    ids = [(11 * i + 5) % 250 + 3 for i in range(n)]
    r.stage_prefill(ids, 0, blocks, SamplingParams(max_tokens=1, temperature=0.0), 0, 0, pad_to=n)
    b = r.buf
    slots = r.ops.prefill_slots(b.prefill_table[0], b.valid_len, r.block_size, b.slot_mapping[:n])
    meta = AttentionMetadata(is_prefill=True, slot_mapping=slots, valid_len=b.valid_len,
                             block_tables=b.prefill_table, seq_lens=b.valid_len,
                             last_index=(b.valid_len - 1).long())
    return b.input_ids[:n], b.positions[:n], meta, blocks


def _compare(llm, n: int) -> None:
    ids, pos, meta, blocks = _staged(llm, n)
    with torch.inference_mode():
        want = llm.model(ids, pos, meta)
        want_k, want_v = llm.kv.k.clone(), llm.kv.v.clone()
        llm.kv.k.fill_(float("nan"))
        llm.kv.v.fill_(float("nan"))
        got = jit_prefill(llm.model, ids, pos, meta)
    assert got is not None
    assert torch.equal(got, want), (got - want).abs().max()
    used = torch.tensor(blocks)  # the prompt's blocks: every slot written, the same values
    for got_c, want_c in ((llm.kv.k, want_k), (llm.kv.v, want_v)):
        flat_got = got_c[:, used].flatten(1, 2)[:, :n]
        flat_want = want_c[:, used].flatten(1, 2)[:, :n]
        assert torch.equal(flat_got, flat_want), n
    llm.scheduler.blocks.allocator.free(blocks)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_jit_prefill_equals_forward_cpu(qkv_bias):
    llm = _llm(qkv_bias, "cpu", "float32")
    for n in (1, 7, 18):
        _compare(llm, n)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_jit_prefill_equals_forward_with_prefill_weight_copy(qkv_bias, monkeypatch):
    """With the transposed QKV / gate-up copies, both paths read the copy where the plan says (here: up to 8 rows
    and 17-32 rows, not 9-16) and the weight elsewhere, so they still agree exactly."""
    llm = _llm(qkv_bias, "cpu", "float32")
    assert llm.model.add_prefill_weight_copies() > 0
    layer = llm.model.layers[0]
    for proj in (layer.qkv_proj, layer.gate_up_proj):
        monkeypatch.setitem(gemm.GEMM_T_CONFIGS, tuple(proj.weight.shape), [(8, "t"), (16, None), (32, "t")])
    for n in (1, 7, 12, 18):
        _compare(llm, n)


def test_jit_prefill_follows_changed_weights():
    """The loop keeps each projection's transposed view between steps: an in-place update of a weight and a weight
    replaced by a new tensor both reach the next step (a stale view would make it differ from forward)."""
    llm = _llm(False, "cpu", "float32")
    _compare(llm, 7)  # the views are made here
    layer = llm.model.layers[1]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.down_proj.weight.mul_(-1.5)
        layer.o_proj.weight = torch.nn.Parameter(torch.randn(layer.o_proj.weight.shape, generator=g) * 0.08,
                                                 requires_grad=False)
    _compare(llm, 7)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_warm_projections_makes_the_jit_paths_products(qkv_bias, monkeypatch):
    """The load's projection warm-up (cuBLAS's first call at each shape) makes every product the JIT path then makes
    at those row counts: the same rows, weight view (the transposed copy where the plan reads it), bias and output
    shape; and beyond max_rows none."""
    llm = _llm(qkv_bias, "cpu", "float32")
    assert llm.model.add_prefill_weight_copies() > 0
    layer = llm.model.layers[0]
    for proj in (layer.qkv_proj, layer.gate_up_proj):
        monkeypatch.setitem(gemm.GEMM_T_CONFIGS, tuple(proj.weight.shape), [(8, "t"), (16, None), (32, "t")])
    calls, project = [], llama_jit._project

    def record(x, weight_kn, bias, out):
        # the weight by its layout: the transposed copy is contiguous, the transposed view is not (every layer's
        # tensors have the first layer's layout)
        calls.append((tuple(x.shape), tuple(weight_kn.shape), weight_kn.stride(), bias is None, tuple(out.shape)))
        project(x, weight_kn, bias, out)

    monkeypatch.setattr(llama_jit, "_project", record)
    warm_projections(llm.model, 20)
    warmed = set(calls)
    assert len(warmed) == 4 * 20 and {c[0][0] for c in warmed} == set(range(1, 21))
    assert sum(not c[3] for c in warmed) == (20 if qkv_bias else 0)  # the QKV bias, at every count
    for n in (1, 7, 12, 18):
        calls.clear()
        ids, pos, meta, blocks = _staged(llm, n)
        with torch.inference_mode():
            assert jit_prefill(llm.model, ids, pos, meta) is not None
        llm.scheduler.blocks.allocator.free(blocks)
        jit_calls = set(calls)
        assert len(jit_calls) == 4 and jit_calls <= warmed, n


def test_jit_prefill_steps_aside():
    llm = _llm(False, "cpu", "float32")
    ids, pos, meta, blocks = _staged(llm, 5)
    with torch.inference_mode():
        with gemm.graph_plan():  # graph captures run the model's own code
            assert jit_prefill(llm.model, ids, pos, meta) is None
        no_last = AttentionMetadata(is_prefill=True, slot_mapping=meta.slot_mapping, valid_len=meta.valid_len)
        assert jit_prefill(llm.model, ids, pos, no_last) is None
    torch_llm = _llm(False, "cpu", "float32", backend="torch")
    ids, pos, meta, _ = _staged(torch_llm, 5)
    with torch.inference_mode():
        assert jit_prefill(torch_llm.model, ids, pos, meta) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_jit_prefill_equals_forward_gpu(qkv_bias, monkeypatch):
    llm = _llm(qkv_bias, "cuda", "float16", max_model_len=512)
    for n in (1, 16, 17, 100, 256):
        _compare(llm, n)
        _compare(llm, n)  # the second time through cached launches
    assert llm.stats()["prefill_weight_copy_bytes"] > 0  # "auto" on CUDA: the transposed copies, planned below
    layer = llm.model.layers[0]
    for proj in (layer.qkv_proj, layer.gate_up_proj):
        monkeypatch.setitem(gemm.GEMM_T_CONFIGS, tuple(proj.weight.shape), [(16, "t"), (100, None), (512, "t")])
    for n in (16, 17, 100, 256):
        _compare(llm, n)
