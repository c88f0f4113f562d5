"""Collectives of one tensor-parallel group: NCCL (GPU) or gloo (CPU) through torch.distributed, and PyTorch's
symmetric-memory one-shot / two-shot all-reduce for small messages on GPUs joined by NVLink.

A decode step's all-reduces are small (hidden size x rows x 2 bytes: 8 KiB for one 7B row) and latency-bound; NCCL's
ring costs ~15 us each inside a CUDA graph on the H200 pair. The one-shot kernel over peer buffers (each rank copies
its input into its symmetric buffer, then every rank reads all peers' buffers and sums) needs one hop and one
barrier. Measured on two H200s (benchmarks/results/nvidia-h200-x2-allreduce-2026-11-30.json; 64 calls captured in
one graph): NCCL 5.9-7.3 us per call from 2 KiB to 128 KiB; PyTorch's one-shot kernel 6.1-7.7 us in bfloat16 and
8.8-11.8 us for a float16 message (its kernels take float32 and bfloat16 only, so float16 goes through a float32
buffer and back). NCCL is therefore the default ("auto") for every size and dtype; `HYBRID_ENGINE_ALLREDUCE=symm`
selects symmetric memory (one-shot up to `SYMM_ONE_SHOT_MAX_BYTES`, two-shot up to `SYMM_TWO_SHOT_MAX_BYTES`).

NVLink multicast is never used: `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` and `NCCL_NVLS_ENABLE=0` are set before any
group is made (multicast objects can take a shared host's GPUs out of service).
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SYMM_ONE_SHOT_MAX_BYTES = 256 * 1024
SYMM_TWO_SHOT_MAX_BYTES = 4 * 1024 * 1024
ALLREDUCE_METHODS = ("auto", "nccl", "symm")
# what the ranks' row-parallel partials are summed in (models/llama.py DecoderLayer._row_parallel): the activations'
# own dtype ("native", the default: each partial rounded first) or float32 (one rounding, as one card; twice the
# bytes and a cast per sum). On the CPU (gloo, float16, the pruned SmolLM2) float32 sums did not raise the greedy
# agreement with TP=1 (column-parallel products and attention round differently per shard shape too): to be
# measured on the GPU before it becomes the default
SUM_DTYPES: dict[str, torch.dtype | None] = {"float32": torch.float32, "native": None}
# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def set_safe_env() -> None:
    """No NVLink multicast (NVLS) in NCCL or symmetric memory; call before any process group exists."""
    for key, value in SAFE_ENV.items():
        os.environ[key] = value


def init_group(rank: int, world_size: int, init_method: str, device: torch.device,
               timeout_s: float = 600.0) -> None:
    """Join the default process group: NCCL on CUDA (this rank's device), gloo on the CPU."""
    set_safe_env()
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed default process group already exists in this process; tensor "
                           "parallelism makes its own (one engine with tensor_parallel_size > 1 per process)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = torch.device("cuda", device.index if device.index is not None else 0)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)


class Communicator:
    """all_reduce (sum) and column all-gather over the default group; every method is usable inside a CUDA graph
    capture (the symmetric buffers are made and registered here, before any capture)."""

    def __init__(self, device: torch.device, method: str | None = None, sum_dtype: str | None = None) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        method = method or os.environ.get("HYBRID_ENGINE_ALLREDUCE", "auto")
        if method not in ALLREDUCE_METHODS:
            raise ValueError(f"HYBRID_ENGINE_ALLREDUCE={method!r} is not allowed; use one of {list(ALLREDUCE_METHODS)}")
        sum_dtype = sum_dtype or os.environ.get("HYBRID_ENGINE_TP_SUM", "native")
        if sum_dtype not in SUM_DTYPES:
            raise ValueError(f"HYBRID_ENGINE_TP_SUM={sum_dtype!r} is not allowed; use one of {list(SUM_DTYPES)}")
        self.sum_dtype = SUM_DTYPES[sum_dtype]
        self.group_name = dist.group.WORLD.group_name
        self.symm: torch.Tensor | None = None
        if device.type == "cuda":
            warm = torch.ones(1, device=device)
            dist.all_reduce(warm)  # the NCCL communicator exists before any capture
            if method == "symm":
                self.symm = self._symmetric_buffer(SYMM_TWO_SHOT_MAX_BYTES, required=True)
        self.method = "symm" if self.symm is not None else "nccl" if device.type == "cuda" else "gloo"

    def _symmetric_buffer(self, nbytes: int, required: bool) -> torch.Tensor | None:
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(nbytes // 4, dtype=torch.float32, device=self.device)  # viewed per dtype
            symm_mem.rendezvous(buf, self.group_name)
            return buf
        except Exception as exc:  # no peer access, an old driver, ...: NCCL for every size
            if required:
                raise
            logger.warning("symmetric-memory all-reduce unavailable (%s); using NCCL for every size", exc)
            return None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks (a new tensor, or `x` summed in place)."""
        nbytes = x.numel() * x.element_size()
        symm = self.symm
        if symm is not None and x.is_contiguous() and nbytes % 16 == 0:
            # PyTorch's symmetric-memory kernels sum float32 and bfloat16; a float16 message is summed in float32
            # (converted on the way into the buffer and back out)
            wide = x.dtype == torch.float16
            numel = x.numel()
            if (numel * 4 if wide else nbytes) <= SYMM_TWO_SHOT_MAX_BYTES:
                view = symm.view(torch.float32 if wide else x.dtype)[:numel].view_as(x)
                out = torch.empty(x.shape, dtype=view.dtype, device=x.device)
                one_shot = nbytes <= SYMM_ONE_SHOT_MAX_BYTES
                if one_shot and not wide:
                    torch.ops.symm_mem.one_shot_all_reduce_copy_out(view, x, "sum", self.group_name, out)
                    return out
                view.copy_(x)
                if one_shot:
                    torch.ops.symm_mem.one_shot_all_reduce_out(view, "sum", self.group_name, out)
                else:
                    torch.ops.symm_mem.two_shot_all_reduce_out(view, "sum", self.group_name, out)
                return out.to(x.dtype) if wide else out
        dist.all_reduce(x)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] per rank -> [N, world_size * C], rank r's columns at r*C."""
        x = x.contiguous()
        n, c = x.shape
        out = torch.empty((self.world_size * n, c), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x)
        return out.view(self.world_size, n, c).permute(1, 0, 2).reshape(n, self.world_size * c)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. the KV blocks every rank can hold)."""
        return self._reduce_int(value, dist.ReduceOp.MIN)

    def max_int(self, value: int) -> int:
        """The largest of every rank's `value`."""
        return self._reduce_int(value, dist.ReduceOp.MAX)

    def _reduce_int(self, value: int, op: Any) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=op)
        return int(t.item())
