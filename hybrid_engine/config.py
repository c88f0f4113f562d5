"""EngineConfig: every option of the engine, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "cuda", "cpu")
ATTENTION_BACKENDS = ("auto", "triton", "torch", "sdpa", "xformers", "flash")
CAPTURE_POLICIES = ("idle", "eager", "off")
PREFILL_WEIGHT_COPY = ("auto", "on", "off")
# Step 16 up to 256 tokens: between 128 and 256 a step is bound by weight reads and tensor cores about equally, so
# every padded row costs (cuBLAS time is a staircase in M; 16 rows of padding cost up to 0.3 ms at ~200 tokens).
DEFAULT_PREFILL_BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256, 288, 320, 384,
                           448, 512)


@dataclass(slots=True)
class EngineConfig:
    """Engine options. Every keyword of `LLM(...)` is a field here.

    model: checkpoint directory, .gguf file, preset name ("tiny-llama", "llama-2-7b-shape",
        "smollm2-135m-instruct") or a PreTrainedModel.
    gguf_file: name of a GGUF file inside the `model` directory (as transformers' `gguf_file=`).
    tensor_parallel_size: GPUs each layer is split over (ranks 1.. run in worker processes, rank 0 in this one;
        NCCL on GPUs cuda:0..N-1, gloo on the CPU). The model must be a preset, checkpoint directory or GGUF file,
        and N must divide its attention heads, KV heads and MLP size. Graphs are then all captured at load.
    dtype: "auto" = the checkpoint's dtype on GPU (float16 for presets), float32 on CPU.
    device: "auto" = cuda when available.
    max_model_len: longest prompt + generation; None = min(checkpoint's max positions, 4096).
    block_size: tokens per KV-cache block.
    num_kv_blocks: fixed block count (at least one max_model_len request's); None = sized from free GPU memory
        (gpu_memory_utilization) or, on CPU, max_num_seqs full requests within 1 GiB. Blocks are taken as sequences
        grow; when they run out the newest sequence is preempted and recomputed later.
    max_num_seqs: most sequences decoded together (batch rows; decode graphs for 1, 2, 4, ... up to it).
    decode_buckets: batch sizes that get a decode graph (max_num_seqs is always one); a step pads up to the
        smallest bucket >= its rows. None (default): 1, 2, 4, ... below max_num_seqs. Since the invariant kernel
        masks rows past the batch it takes as long at 1 row as at 16 (benchmarks/NOTES.md), padding buys nothing.
    prefill_chunk_size: a prompt longer than this that arrives while others decode is prefilled in chunks of this
        many tokens, one chunk per step, so that the running streams wait at most about one chunk per token.
    batched_prefill: prompts admitted in the same step (two or more, whole, unconstrained) run as one forward pass
        on the JIT path, their projections reading the weights once, instead of one (graph-replayed) prefill each;
        off by default until measured on a GPU (benchmarks/NOTES.md). Under tensor parallelism every rank runs it
        (eagerly: its collectives are outside graphs).
    enable_prefix_caching: reuse the KV blocks of a prompt's cached prefix (full blocks, hashed over their tokens
        and everything before them) and prefill only the rest; freed blocks stay cached until evicted (LRU).
    attention_backend: "auto" = triton on GPU, torch on CPU.
    capture: CUDA-graph policy: "idle" (background worker, idle windows), "eager" (capture before serving), "off".
    prefill_buckets: prompt-length buckets that get a prefill graph.
    batch_invariant: decode projections (QKV, O, gate/up, down, LM head) through one Triton kernel whose per-row
        sums keep one order at every batch size (kernels/decode_gemm.py), so a request's greedy tokens do not
        depend on what else is batched with it (the default). False: the one-row GEMVs at batch 1 and the product
        plan per row count above it. On the H200, LLaMA-2-7B shape: TPOT at batch 1 3.91 ms invariant against
        3.76 with the GEMVs and 3.87 for the main before batching (same lease); on small models the GEMVs are
        faster (SmolLM2-135M shape 0.44 vs 0.72 ms, Llama-3.2-1B shape 0.84 vs 1.01; benchmarks/NOTES.md).
    prefill_weight_copy: keep a second, transposed copy of the QKV and gate/up weights for multi-row (prefill)
        projections: cuBLAS's NN kernels are 4-9% faster there on the H100 (about -0.27 ms TTFT at 200 tokens for
        LLaMA-2-7B), for ~2/3 more weight memory (+9 GB for 7B). "auto" = on for CUDA when the copy takes at most
        a quarter of the memory free after loading, "on" = always (any device), "off" = never.
    """

    model: Any = "tiny-llama"
    tokenizer: Any = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 32
    decode_buckets: tuple[int, ...] | None = None
    prefill_chunk_size: int = 512
    enable_prefix_caching: bool = True
    batched_prefill: bool = False
    attention_backend: str = "auto"
    capture: str = "idle"
    prefill_buckets: tuple[int, ...] = DEFAULT_PREFILL_BUCKETS
    prefill_weight_copy: str = "auto"
    batch_invariant: bool = True
    seed: int = 0
    trust_remote_code: bool = False
    gguf_file: str | None = None
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("capture", self.capture, CAPTURE_POLICIES)
        _choice("prefill_weight_copy", self.prefill_weight_copy, PREFILL_WEIGHT_COPY)
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size={self.block_size!r} is not allowed; use one of 8, 16, 32, 64, 128")
        if self.max_model_len is not None and not (isinstance(self.max_model_len, int) and self.max_model_len >= 2):
            raise ValueError(f"max_model_len={self.max_model_len!r} must be an int >= 2 (or None for the model's)")
        if self.num_kv_blocks is not None and not (isinstance(self.num_kv_blocks, int) and self.num_kv_blocks >= 1):
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks!r} must be a positive int or None")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization!r} must be in [0.05, 0.99]")
        if not (isinstance(self.max_num_seqs, int) and not isinstance(self.max_num_seqs, bool)
                and 1 <= self.max_num_seqs <= 256):
            raise ValueError(f"max_num_seqs={self.max_num_seqs!r} must be an int in [1, 256]")
        if self.decode_buckets is not None:
            buckets = self.decode_buckets
            ints = isinstance(buckets, (tuple, list)) and bool(buckets) and all(
                isinstance(b, int) and not isinstance(b, bool) for b in buckets)
            if (not ints or list(buckets) != sorted(set(buckets))
                    or not 1 <= buckets[0] <= buckets[-1] <= self.max_num_seqs):
                raise ValueError(f"decode_buckets={self.decode_buckets!r} must be strictly increasing ints in "
                                 f"[1, max_num_seqs={self.max_num_seqs}] (or None for powers of two)")
            self.decode_buckets = tuple(buckets)
        if not (isinstance(self.prefill_chunk_size, int) and not isinstance(self.prefill_chunk_size, bool)
                and self.prefill_chunk_size >= 16):
            raise ValueError(f"prefill_chunk_size={self.prefill_chunk_size!r} must be an int >= 16")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant={self.batch_invariant!r} must be True or False")
        if not isinstance(self.batched_prefill, bool):
            raise ValueError(f"batched_prefill={self.batched_prefill!r} must be True or False")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching={self.enable_prefix_caching!r} must be True or False")
        if not (isinstance(self.tensor_parallel_size, int) and not isinstance(self.tensor_parallel_size, bool)
                and 1 <= self.tensor_parallel_size <= 8):
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size!r} must be an int in [1, 8]")
        if self.tensor_parallel_size > 1 and not isinstance(self.model, str):
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs the model as a preset name, "
                             f"checkpoint directory or .gguf path (each worker loads its own shard), not a "
                             f"{type(self.model).__name__} object")
        buckets = tuple(int(b) for b in self.prefill_buckets)
        if any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"prefill_buckets={self.prefill_buckets!r} must be strictly increasing positive ints")
        self.prefill_buckets = buckets

    @classmethod
    def from_kwargs(cls, model: Any, **kwargs: Any) -> "EngineConfig":
        """Build from `LLM(...)` keywords; an unknown keyword is an error, never silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown EngineConfig option(s) {unknown}; allowed: {sorted(known - {'model'})}")
        return cls(model=model, **kwargs)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; use one of {list(allowed)}")
