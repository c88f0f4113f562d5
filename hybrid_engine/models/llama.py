"""One readable Llama-family decoder (Llama 1/2/3, Mistral, Qwen2) over a paged KV cache.

Weights are fused at load time: q/k/v into `qkv_proj`, gate/up into `gate_up_proj`. Every non-GEMM operation goes
through a `KernelOps` (Triton kernels on GPU, torch references on CPU), so one model serves the JIT path and the
CUDA graphs alike. Shapes are flat over tokens: prefill runs T tokens of one sequence, decode one token per sequence.
"""
from __future__ import annotations

import dataclasses
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .._local import local_setting


_LAYER_HOOK = threading.local()


@contextmanager
def between_layers(hook: Callable[[], None] | None) -> Iterator[None]:
    """On this thread, call `hook()` after each decoder layer of `LlamaModel.forward` (the capture worker pauses
    there while a request is in flight, so the request's host work does not share the GIL with a capture)."""
    with local_setting(_LAYER_HOOK, "fn", hook):
        yield


@dataclass(slots=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    # tensor parallelism: this rank's share of the heads, the MLP and the vocabulary (see `sharded`)
    tp_rank: int = 0
    tp_size: int = 1

    @classmethod
    def from_hf(cls, config: Any) -> "ModelArgs":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            qkv_bias=bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=config.max_position_embeddings,
        )

    def sharded(self, rank: int, size: int) -> "ModelArgs":
        """This rank's shape under tensor parallelism over `size` ranks: attention heads, KV heads and the MLP's
        intermediate size split evenly (column-parallel QKV and gate/up, row-parallel O and down), the vocabulary in
        `vocab_shard` rows per rank (the last shard padded). Raises ValueError naming a size that does not split."""
        if size == 1:
            return self
        for what, n in (("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads),
                        ("intermediate_size", self.intermediate_size)):
            if n % size:
                raise ValueError(f"tensor_parallel_size={size} must divide the model's {what}={n}")
        return dataclasses.replace(self, num_heads=self.num_heads // size, num_kv_heads=self.num_kv_heads // size,
                                   intermediate_size=self.intermediate_size // size, tp_rank=rank, tp_size=size)

    @property
    def vocab_shard(self) -> int:
        """Embedding / LM-head rows per rank: ceil(vocab_size / tp_size)."""
        return -(-self.vocab_size // self.tp_size)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(slots=True)
class AttentionMetadata:
    """What attention needs besides q/k/v. Prefill: one sequence of T (maybe padded) tokens, or (`seqs`) several
    sequences' tokens one after another. Decode: B sequences."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] flat cache slot per token, -1 = padding (write nothing)
    valid_len: torch.Tensor | None = None  # prefill: [1] int32 real length of a padded bucket
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32 (prefill: only for last_index)
    # [B] int32, tokens in cache including the current one (prefill: cached context + valid_len)
    seq_lens: torch.Tensor | None = None
    # prefill: [1] int64 index of the last real token. When set, the last layer runs its attention output, MLP and
    # residual for that row only (the logits need nothing else; its K/V for every row are cached before), and the
    # model returns that one row. Its attention is the decode kernel over the cache, which now holds the prompt.
    last_index: torch.Tensor | None = None
    # prefill after cached positions (a prefix-cache hit, a later prompt chunk): [1] int32 device tensor, how many
    # positions before the first token are already in the cache (a tensor: one graph serves every start). Attention
    # then reads the cached context too. None for a whole prompt.
    context_start: torch.Tensor | None = None
    # prefill of several sequences in one step (runner.prefill_batch; the JIT path): per sequence, host ints
    # (first row, end row, positions already cached); block_tables [S, M], seq_lens [S], last_index [S] then hold
    # one entry per sequence. None: one sequence.
    seqs: tuple[tuple[int, int, int], ...] | None = None


def rope_cos_sin_cache(config: Any, head_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] fp32 rows of cat(cos, sin) over the rotary half, exactly as transformers computes."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"rope_type={rope_type!r} is not supported; supported: default, linear, llama3, yarn")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq.float())
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.args = args
        self.layer_id = layer_id
        h, qkv = args.hidden_size, args.q_size + 2 * args.kv_size
        self.qkv_proj = nn.Linear(h, qkv, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.q_size, h, bias=False)
        self.gate_up_proj = nn.Linear(h, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, h, bias=False)
        for proj in (self.qkv_proj, self.gate_up_proj):  # W^T [K, N] copies for prefill (add_prefill_weight_copies)
            proj.register_buffer("weight_t", None, persistent=False)
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, Hkv, D], bound by the KV cache
        self.v_cache: torch.Tensor | None = None
        self.comm: Any = None  # tensor parallelism: sums the row-parallel O and down projections over the ranks

    def forward(self, ops: Any, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                cos_sin: torch.Tensor, meta: AttentionMetadata,
                last_row_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        linear = ops.linear if meta.is_prefill else ops.decode_linear
        p, scale, q = self.qkv_proj, a.head_dim ** -0.5, None
        decode = not meta.is_prefill
        if decode and residual is not None and ops.norm_linear_rope_store is not None:
            # one-row decode: residual add, RMSNorm, QKV, rope and KV writes in one kernel (None: does not apply)
            fused = ops.norm_linear_rope_store(x, residual, self.input_layernorm, a.rms_norm_eps, p.weight, p.bias,
                                               positions, cos_sin, self.k_cache, self.v_cache, meta.slot_mapping,
                                               a.num_heads, a.num_kv_heads)
            if fused is not None:
                q, residual = fused
        if q is None:
            if residual is None:
                residual, x = x, ops.rms_norm(x, self.input_layernorm, a.rms_norm_eps)
            else:
                x, residual = ops.rms_norm(x, self.input_layernorm, a.rms_norm_eps, residual)
            if decode and ops.linear_rope_store is not None:  # decode: QKV, rope and KV writes in one kernel
                q = ops.linear_rope_store(x, p.weight, p.bias, positions, cos_sin, self.k_cache, self.v_cache,
                                          meta.slot_mapping, a.num_heads, a.num_kv_heads)  # None: does not apply
        if q is not None:
            attn = ops.decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, scale)
        else:
            qkv = linear(x, p.weight, p.bias, p.weight_t).view(-1, a.num_heads + 2 * a.num_kv_heads, a.head_dim)
            q, k, v = qkv.split([a.num_heads, a.num_kv_heads, a.num_kv_heads], dim=1)  # [T, heads, D] views
            attn = self._attend(ops, q, k, v, positions, cos_sin, meta, scale, last_row_only)
            if last_row_only:
                residual = residual.index_select(0, meta.last_index)
        x = self._row_parallel(linear, attn.reshape(-1, a.q_size), self.o_proj.weight)
        gu, act = self.gate_up_proj, None
        if decode and ops.norm_linear_silu_mul is not None:  # one-row decode: the norm, gate/up and SiLU-mul at once
            fused = ops.norm_linear_silu_mul(x, residual, self.post_attention_layernorm, a.rms_norm_eps, gu.weight)
            if fused is not None:
                act, residual = fused
        if act is None:
            x, residual = ops.rms_norm(x, self.post_attention_layernorm, a.rms_norm_eps, residual)
            # decode: gate/up projection and SiLU-mul in one kernel where the backend has it (None: does not apply)
            act = ops.linear_silu_mul(x, gu.weight) if decode and ops.linear_silu_mul is not None else None
            if not decode and ops.prefill_linear_silu_mul is not None:  # a few-row captured prefill (None: n/a)
                act = ops.prefill_linear_silu_mul(x, gu.weight)
        if act is None:
            act = ops.silu_mul(linear(x, gu.weight, None, gu.weight_t))
        return self._row_parallel(linear, act, self.down_proj.weight), residual

    def _row_parallel(self, linear: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The O or down projection; under tensor parallelism its ranks' partials summed. With the communicator's
        `sum_dtype` float32 (HYBRID_ENGINE_TP_SUM=float32) each rank's partial stays the projection's float32 sum,
        the ranks add those, and the total is rounded once to x's dtype, as one card rounds its own float32 sum: this
        projection then differs from TP=1 only by float32 summation order, where 16-bit partials are rounded twice."""
        comm = self.comm
        if comm is None:
            return linear(x, weight)
        wide = comm.sum_dtype
        if wide is None or wide == x.dtype:
            return comm.all_reduce(linear(x, weight))
        return comm.all_reduce(linear(x, weight, out_dtype=wide), out_dtype=x.dtype)

    def _attend(self, ops: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                cos_sin: torch.Tensor, meta: AttentionMetadata, scale: float, last_row_only: bool) -> torch.Tensor:
        """Rope, KV-cache writes and attention over the projected q, k, v (last_row_only: the last row's only)."""
        chunk = meta.context_start is not None
        many = meta.seqs is not None
        if (meta.is_prefill and not last_row_only and not chunk and not many
                and ops.prefill_attention_rope is not None):
            # one launch: rope, KV-cache writes and causal attention
            return ops.prefill_attention_rope(q, k, v, positions, cos_sin, self.k_cache, self.v_cache,
                                              meta.slot_mapping, scale, meta.valid_len)
        if ops.rope_store_kv is not None:  # one fused kernel where the backend has it
            q, k = ops.rope_store_kv(q, k, v, positions, cos_sin, self.k_cache, self.v_cache, meta.slot_mapping)
        else:
            q, k = ops.rope(q, k, positions, cos_sin)
            ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.is_prefill and not last_row_only and many:  # each sequence over its cached context and itself
            out = torch.empty_like(q)
            for i, (first, end, start) in enumerate(meta.seqs):
                out[first:end] = ops.cached_prefill_attention(q[first:end], self.k_cache, self.v_cache,
                                                              meta.block_tables[i], start, scale)
            return out
        if meta.is_prefill and not last_row_only and chunk:
            return ops.cached_prefill_attention(q, self.k_cache, self.v_cache, meta.block_tables[0],
                                                meta.context_start, scale, meta.valid_len)
        if meta.is_prefill and not last_row_only:
            return ops.prefill_attention(q, k, v, scale, meta.valid_len)
        if last_row_only:
            q = q.index_select(0, meta.last_index)
        return ops.decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, scale)


class LlamaModel(nn.Module):
    """Decoder + LM head. `forward` returns hidden states (prefill with `meta.last_index`: the last row's only);
    `compute_logits` applies the final norm and head."""

    def __init__(self, args: ModelArgs, cos_sin_cache: torch.Tensor) -> None:
        super().__init__()
        self.args = args
        # tensor parallelism: a vocab shard. Its weight is given (empty, as the loader's meta-device build wants),
        # so that no random init runs: normal_ on a meta tensor imports torch's Python decompositions (~0.8 s)
        self.embed_tokens = nn.Embedding(args.vocab_shard, args.hidden_size,
                                         _weight=torch.empty(args.vocab_shard, args.hidden_size, device="meta"))
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = nn.Parameter(torch.ones(args.hidden_size))
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_shard, bias=False)
        self.register_buffer("cos_sin_cache", cos_sin_cache, persistent=False)
        self.ops: Any = None  # KernelOps, set by the runner
        self.comm: Any = None  # distributed.Communicator under tensor parallelism (set_comm), else None

    def set_comm(self, comm: Any) -> None:
        """Tensor parallelism: every layer sums its row-parallel projections over the ranks through `comm`, the
        embedding sums the vocab shards' rows, the logits gather them."""
        self.comm = comm
        for layer in self.layers:
            layer.comm = comm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return self.embed_tokens(input_ids)
        shard = self.args.vocab_shard  # ids outside this rank's rows read row 0 and are zeroed; the sum fills them
        local = input_ids - self.args.tp_rank * shard
        outside = (local < 0) | (local >= shard)
        x = self.embed_tokens(local.clamp(0, shard - 1)).masked_fill_(outside.unsqueeze(-1), 0)
        return self.comm.all_reduce(x)

    def prefill_weight_copy_bytes(self) -> int:
        """Bytes `add_prefill_weight_copies` allocates (QKV and gate/up weights of every layer)."""
        return sum(p.weight.numel() * p.weight.element_size()
                   for layer in self.layers for p in (layer.qkv_proj, layer.gate_up_proj))

    def add_prefill_weight_copies(self) -> int:
        """Give QKV and gate/up a second copy of their weight, stored transposed (W^T [K, N] contiguous, buffer
        `weight_t`), which multi-row projections read where the plan says it is faster (`gemm.GEMM_T_CONFIGS`:
        cuBLAS's NN kernels, 4-9% faster at 16-288 rows on the H100); one-row projections (decode) keep reading
        `weight` ([N, K], the layout the GEMV reads fastest). Returns the bytes added."""
        for layer in self.layers:
            for proj in (layer.qkv_proj, layer.gate_up_proj):
                if proj.weight_t is None:
                    proj.weight_t = proj.weight.detach().t().contiguous()
        return self.prefill_weight_copy_bytes()

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                residual_apart: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after the last layer ([T, H]; a prefill with `meta.last_index`: the last row's only),
        or with `residual_apart` the last layer's output and the residual (x, residual) it adds to, for
        `compute_logits(x, residual=residual)` to add in its norm kernel."""
        x, residual = self.embed(input_ids), None
        last = len(self.layers) - 1 if meta.is_prefill and meta.last_index is not None else -1
        ops, cos_sin, hook = self.ops, self.cos_sin_cache, getattr(_LAYER_HOOK, "fn", None)
        for i, layer in enumerate(self.layers):  # .forward: no module hooks, less host time per layer (JIT path)
            x, residual = layer.forward(ops, x, residual, positions, cos_sin, meta, last_row_only=i == last)
            if hook is not None:
                hook()
        return (x, residual) if residual_apart else x + residual

    def compute_logits(self, hidden: torch.Tensor, residual: torch.Tensor | None = None, decode: bool = False,
                       fp32: bool = True) -> torch.Tensor:
        """hidden (+ residual): [N, H] pre-norm residual stream -> [N, vocab] fp32 logits (decode: one row per
        sequence; fp32=False: in the model's dtype, for a consumer that converts them itself, one kernel less)."""
        if residual is None:
            x = self.ops.rms_norm(hidden, self.norm, self.args.rms_norm_eps)
        else:
            x, _ = self.ops.rms_norm(hidden, self.norm, self.args.rms_norm_eps, residual)
        logits = (self.ops.decode_linear if decode else self.ops.linear)(x, self.lm_head.weight)
        if self.comm is not None:  # [N, vocab_shard] per rank -> [N, vocab] on every rank
            logits = self.comm.all_gather_columns(logits)
            if logits.shape[1] != self.args.vocab_size:  # the last shard's padding rows
                logits = logits[:, :self.args.vocab_size].contiguous()
        return logits.float() if fp32 else logits
