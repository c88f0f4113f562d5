"""Collectives of one tensor-parallel group: NCCL (GPU) or gloo (CPU) through torch.distributed, and PyTorch's
symmetric-memory one-shot / two-shot all-reduce for small messages on GPUs joined by NVLink.

A decode step's all-reduces are small (hidden size x rows x 2 bytes: 8 KiB for one 7B row) and latency-bound; NCCL's
ring costs ~15 us each inside a CUDA graph on the H200 pair. The one-shot kernel over peer buffers (each rank copies
its input into its symmetric buffer, then every rank reads all peers' buffers and sums) needs one hop and one
barrier. Measured on two H200s (benchmarks/results/nvidia-h200-x2-allreduce-2026-11-30.json; 64 calls captured in
one graph): NCCL 5.9-7.3 us per call from 2 KiB to 128 KiB; PyTorch's one-shot kernel 6.1-7.7 us in bfloat16 and
8.8-11.8 us for a float16 message (its kernels take float32 and bfloat16 only, so float16 goes through a float32
buffer and back). `HYBRID_ENGINE_ALLREDUCE=symm` selects those kernels (one-shot up to `SYMM_ONE_SHOT_MAX_BYTES`,
two-shot up to `SYMM_TWO_SHOT_MAX_BYTES`).

Our own one-shot kernel (kernels/allreduce.py, "peer") uses symmetric memory only for its buffers: it takes float16,
bfloat16 and float32 (a float32 partial rounded once on the way out), runs in the same kernel chain as the layers
(PDL), and is used for messages up to `PEER_MAX_BYTES` inside CUDA graphs, where every rank replays the same calls;
eager calls (warm-up, the JIT path, where one rank may still be compiling while the other waits) use NCCL, which
costs the same there (25-40 us a call). Its protocol is tested on one card (two ranks on two streams); it has not
run on two cards yet, so "auto" stays NCCL and `HYBRID_ENGINE_ALLREDUCE=peer` selects it.

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
PEER_HALF_BYTES = 4 * 1024 * 1024  # each rank's peer buffer: two halves of this (kernels/allreduce.py)
PEER_MAX_BYTES = 1024 * 1024
# a peer kernel waiting longer than this for another rank gives up (a dead worker; the engine has reported it by
# then). Inside graphs the ranks replay the same steps, so a live peer lags by host hiccups only; 10 s also keeps a
# dead group's close within the tensor-parallel test's 30 s
PEER_TIMEOUT_S = 10.0
ALLREDUCE_METHODS = ("auto", "nccl", "symm", "peer")
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
        self.peer: PeerAllReduce | None = None
        if device.type == "cuda":
            warm = torch.ones(1, device=device)
            dist.all_reduce(warm)  # the NCCL communicator exists before any capture
            if method == "symm":
                self.symm = self._symmetric_buffer(SYMM_TWO_SHOT_MAX_BYTES, required=True)
            elif method == "peer":
                self.peer = PeerAllReduce(self.group_name, self.rank, self.world_size, device)
        self.method = ("symm" if self.symm is not None else "peer" if self.peer is not None
                       else "nccl" if device.type == "cuda" else "gloo")

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

    def all_reduce(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Sum of `x` over the ranks (a new tensor, or `x` summed in place), in `out_dtype` if given (a float32
        `x` summed, then rounded once)."""
        nbytes = x.numel() * x.element_size()
        peer = self.peer
        if (peer is not None and nbytes <= PEER_MAX_BYTES and x.is_contiguous()
                and torch.cuda.is_current_stream_capturing()):
            return peer(x, torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device))
        out = self._all_reduce(x)
        return out if out_dtype is None or out.dtype == out_dtype else out.to(out_dtype)

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
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


class PeerAllReduce:
    """The one-shot kernel's state on one rank (kernels/allreduce.py): a symmetric-memory area (two data halves of
    `PEER_HALF_BYTES`, then the flags, zeroed here before any rank uses them), every rank's addresses of it, this
    rank's call counters and a pinned host word a kernel that gave up waiting sets (`abandoned_any`)."""

    def __init__(self, group_name: str, rank: int, world_size: int, device: torch.device,
                 half_bytes: int = PEER_HALF_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        from ..kernels import allreduce as ar

        self.rank, self.half_bytes = rank, half_bytes
        flag_bytes = ar.flag_words(world_size) * 4
        self.area = symm_mem.empty(2 * half_bytes + flag_bytes, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(self.area, group_name)
        ptrs = [int(p) for p in handle.buffer_ptrs]
        if len(ptrs) != world_size or any(p % 16 for p in ptrs):
            raise RuntimeError(f"symmetric memory gave {len(ptrs)} buffers for {world_size} ranks (16-byte aligned)")
        self.data_ptrs = torch.tensor(ptrs, dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor([p + 2 * half_bytes for p in ptrs], dtype=torch.int64, device=device)
        self.calls = torch.zeros(ar.MAX_PROGRAMS, dtype=torch.int32, device=device)
        self.abandoned = torch.zeros(1, dtype=torch.int32).pin_memory()
        self.area[2 * half_bytes:].zero_()
        torch.cuda.current_stream(device).synchronize()
        dist.barrier(device_ids=[device.index if device.index is not None else 0])  # every rank's flags are zero
        torch.cuda.current_stream(device).synchronize()
        self._reduce = ar.peer_all_reduce

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, out, self.data_ptrs, self.flag_ptrs, self.calls, self.abandoned, self.rank,
                            self.half_bytes, PEER_TIMEOUT_S)

    def abandoned_any(self) -> bool:
        return bool(self.abandoned[0])
