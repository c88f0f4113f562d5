"""The JIT path's prefill with less host time per layer (Triton backend).

A prefill at a length no graph covers yet (the first request after load; a bucket still being captured) runs
eagerly, and there it is bound by host time: ~300 launches, each costing more host time than its GPU time
(benchmarks/NOTES.md, 2026-11-26 21:47). `jit_prefill` runs the same kernels as `LlamaModel.forward`, in the same
order and with the same configurations, so its results are the same, but:

- the activations of one step live in buffers made once per step, reused by every layer (the projections write into
  them: `torch.mm(..., out=)`; the residual stream is updated in place by the fused add + RMSNorm);
- each Triton launch's arguments are computed once (first layer) and re-issued for later layers with that layer's
  weight and KV-cache addresses only (`_triton.Launch`);
- the last layer, which computes one row (`AttentionMetadata.last_index`), runs LlamaModel's own code.

It returns None where it does not apply (another backend, tensor parallelism, inside a graph capture, a length past the fused
attention's JIT limit, mixed dtypes, ...), and the caller then runs `model.forward`.
"""
from __future__ import annotations

from typing import Any

import torch

from ..kernels import gemm
from ..kernels._triton import Launch, launch
from ..kernels.activation import silu_mul_launch
from ..kernels.prefill_attention import fused_applies, prefill_attention_rope_launch
from ..kernels.rms_norm import rms_norm_launch

# positions of the per-layer tensors in the launch arguments (see the *_launch builders)
_NORM_WEIGHT = 2
_K_CACHE, _V_CACHE = 5, 6


def _project(x: torch.Tensor, weight_kn: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = x @ weight_kn (+ bias), into `out`; weight_kn is W^T: the weight's transposed view or its copy."""
    if bias is None:
        torch.mm(x, weight_kn, out=out)
    else:
        torch.addmm(bias, x, weight_kn, out=out)


def _kn(proj: Any) -> torch.Tensor:
    """`proj.weight.t()`, made once per weight tensor and kept on the module (a view: it follows in-place updates of
    the weight; a replaced weight gets a new one). Saves a torch op (~2-6 us of host time) per projection."""
    w = proj.weight
    cached = proj.__dict__.get("_jit_kn")
    if cached is None or cached[0] is not w:
        cached = proj.__dict__["_jit_kn"] = (w, w.t())
    return cached[1]


def jit_prefill(model: Any, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor | None:
    """`model.forward(input_ids, positions, meta)` for a prefill with `meta.last_index` set (the last real row's
    pre-norm hidden state, [1, H]), or None where this path does not apply."""
    ops, layers = model.ops, model.layers
    n = input_ids.shape[0]
    if (ops is None or model.comm is not None or ops.prefill_attention_rope is None or not meta.is_prefill
            or meta.last_index is None or meta.valid_len is None or meta.context_start is not None or len(layers) < 2
            or n == 0 or gemm.in_graph_plan()):
        return None
    a, first = model.args, layers[0]
    dtype, device = model.embed_tokens.weight.dtype, input_ids.device
    if any(t.dtype != dtype for t in (first.input_layernorm, first.post_attention_layernorm, first.k_cache)):
        return None
    heads = a.num_heads + 2 * a.num_kv_heads

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    qkv = empty(n, heads, a.head_dim)
    q, k, v = qkv.split([a.num_heads, a.num_kv_heads, a.num_kv_heads], dim=1)
    cos_sin = model.cos_sin_cache
    if not fused_applies(q, k, v, cos_sin, first.k_cache, first.v_cache):
        return None
    hidden, inter = a.hidden_size, first.gate_up_proj.weight.shape[0] // 2
    xn, o, h, attn = empty(n, hidden), empty(n, hidden), empty(n, hidden), empty(n, a.num_heads, a.head_dim)
    gate_up, act = empty(n, 2 * inter), empty(n, inter)
    qkv2, attn2 = qkv.view(n, -1), attn.view(n, -1)
    eps = a.rms_norm_eps
    res = model.embed_tokens(input_ids)  # the residual stream, updated in place from here on

    fn, grid, args, kw = rms_norm_launch(res, res, first.input_layernorm, xn, xn, eps, False)
    launch(fn, grid, *args, **kw)
    attention = Launch(*prefill_attention_rope_launch(q, k, v, positions, cos_sin, first.k_cache, first.v_cache,
                                                      meta.slot_mapping, attn, meta.valid_len, a.head_dim ** -0.5))
    post_norm = Launch(*rms_norm_launch(o, res, first.post_attention_layernorm, xn, res, eps, True))
    silu_mul = Launch(*silu_mul_launch(gate_up, act))
    in_norm = Launch(*rms_norm_launch(h, res, layers[1].input_layernorm, xn, res, eps, True))
    # whether ops.linear reads the transposed copies at n rows: decided once per step (every layer has the same shapes)
    qkv_copy, gate_up_copy = (gemm.reads_copy(n, p.weight, p.weight_t) for p in (first.qkv_proj, first.gate_up_proj))
    for i, layer in enumerate(layers[:-1]):
        if i > 0:
            in_norm({_NORM_WEIGHT: layer.input_layernorm} if i > 1 else None)
        p = layer.qkv_proj
        _project(xn, p.weight_t if qkv_copy else _kn(p), p.bias, qkv2)
        attention({_K_CACHE: layer.k_cache, _V_CACHE: layer.v_cache} if i else None)
        _project(attn2, _kn(layer.o_proj), None, o)
        post_norm({_NORM_WEIGHT: layer.post_attention_layernorm} if i else None)
        p = layer.gate_up_proj
        _project(xn, p.weight_t if gate_up_copy else _kn(p), None, gate_up)
        silu_mul()
        _project(act, _kn(layer.down_proj), None, h)
    x, res = layers[-1].forward(ops, h, res, positions, cos_sin, meta, last_row_only=True)
    return x + res


def warm_projections(model: Any, max_rows: int) -> None:
    """Each projection of a decoder layer (QKV, O, gate/up, down: every layer has the same shapes) once at every row
    count 1..max_rows, on scratch rows, as the JIT path calls it at that count (`_project`: the transposed copy
    where `gemm.reads_copy` says so, the bias of QKV; `LlamaModel.forward`'s `ops.linear` makes the same cuBLAS
    calls). cuBLAS does host work the first time it meets a product's shape: on the H200 (7B shape) ~0.3 ms per row
    count and projection, and 2.4-4.8 ms each time a count brings in a kernel it has not run before (0.5 s over
    1..256 rows). Done here, at load, it no longer falls on the first request of each prompt length (a first
    50-token request took 20 ms against 7 ms for the next). Runs on the caller's current stream; torch releases the
    GIL inside each product, so a thread can run it beside the load's Python (`runtime/rank.py`)."""
    layers = getattr(model, "layers", None)
    if not layers or max_rows < 1:
        return
    layer = layers[0]
    for proj, bias in ((layer.qkv_proj, layer.qkv_proj.bias), (layer.o_proj, None), (layer.gate_up_proj, None),
                       (layer.down_proj, None)):
        weight, weight_t = proj.weight, getattr(proj, "weight_t", None)
        x = torch.zeros(max_rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        out = torch.empty(max_rows, weight.shape[0], dtype=weight.dtype, device=weight.device)
        for rows in range(1, max_rows + 1):
            _project(x[:rows], weight_t if gemm.reads_copy(rows, weight, weight_t) else _kn(proj), bias, out[:rows])
