"""Small all-reduces on the GPUs of one host: NCCL vs our one-shot peer kernel vs PyTorch symmetric memory (one-shot,
two-shot; no multicast), per message size, eager and inside a CUDA graph (64 calls captured in one graph, as a
decode step's collectives are).

    python benchmarks/allreduce_bench.py --gpus 2 --out allreduce.json

The choice of method per size in hybrid_engine/distributed/comm.py comes from this table.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

SIZES = [2048, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1 << 20, 2 << 20, 4 << 20, 16 << 20]
# PyTorch's symmetric-memory all-reduce kernels take float32 and bfloat16, not float16: "*_f32" convert a float16
# message into a float32 symmetric buffer and back (what hybrid_engine does for float16 models); "*_bf16" are the
# native bfloat16 kernels on a message of the same element count (for bfloat16 models)
# "peer": our one-shot kernel (hybrid_engine/kernels/allreduce.py) on the float16 message; "peer_f32": the same on a
# float32 message of the same element count, rounded to float16 on the way out (HYBRID_ENGINE_TP_SUM=float32)
METHODS = ("nccl", "peer", "peer_f32", "one_shot_f32", "two_shot_f32", "one_shot_bf16", "two_shot_bf16")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world: int, port: int, out_path: str, calls: int, sizes: list[int], methods: list[str]) -> None:
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device)
    group = dist.group.WORLD.group_name
    dist.all_reduce(torch.ones(1, device=device))
    symm = symm_mem.empty(max(sizes) * 2, dtype=torch.uint8, device=device)  # float32 of the largest fp16 message
    symm_mem.rendezvous(symm, group)
    from hybrid_engine.distributed.comm import PeerAllReduce

    peer = PeerAllReduce(group, rank, world, device, half_bytes=max(sizes) * 2)
    bf16 = {}
    stream = torch.cuda.Stream(device)
    results: dict[str, dict[str, float]] = {}

    def op(method: str, x: torch.Tensor, out: torch.Tensor) -> None:
        n = x.numel()
        if method == "nccl":
            dist.all_reduce(x)
        elif method == "peer":
            peer(x, out)
        elif method == "peer_f32":
            peer(bf16["f32_in"][:n], out)
        elif method.endswith("_f32"):
            view, wide = symm.view(torch.float32)[:n], bf16["f32_out"][:n]
            view.copy_(x)
            fn = torch.ops.symm_mem.one_shot_all_reduce_out if method.startswith("one") else \
                torch.ops.symm_mem.two_shot_all_reduce_out
            fn(view, "sum", group, wide)
            out.copy_(wide)
        else:
            view, src, dst = symm.view(torch.bfloat16)[:n], bf16["x"][:n], bf16["out"][:n]
            if method.startswith("one"):
                torch.ops.symm_mem.one_shot_all_reduce_copy_out(view, src, "sum", group, dst)
            else:
                view.copy_(src)
                torch.ops.symm_mem.two_shot_all_reduce_out(view, "sum", group, dst)

    big = max(sizes) // 2
    bf16.update(x=torch.full((big,), float(rank + 1), dtype=torch.bfloat16, device=device),
                out=torch.empty(big, dtype=torch.bfloat16, device=device),
                f32_out=torch.empty(big, dtype=torch.float32, device=device),
                f32_in=torch.empty(big, dtype=torch.float32, device=device))
    for nbytes in sizes:
        n = nbytes // 2
        x = torch.full((n,), float(rank + 1), dtype=torch.float16, device=device)
        out = torch.empty_like(x)
        row: dict[str, float] = {}
        for method in methods:
            with torch.cuda.stream(stream):
                for _ in range(5):
                    x.fill_(rank + 1)
                    op(method, x, out)
                if method == "peer_f32":
                    bf16["f32_in"].fill_(rank + 1)
                got = (x if method == "nccl" else bf16["out"] if method.endswith("bf16") else out)[0].item()
                want = world * (world + 1) / 2
                if got != want:
                    raise AssertionError(f"{method} at {nbytes} B summed to {got}, expected {want}")
                dist.barrier()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                for _ in range(calls):
                    op(method, x, out)
                end.record(stream)
                end.synchronize()
                row[f"{method}_eager_us"] = round(start.elapsed_time(end) * 1e3 / calls, 2)
                graph = torch.cuda.CUDAGraph()
                stream.synchronize()
                dist.barrier()
                graph.capture_begin(capture_error_mode="thread_local")
                for _ in range(calls):
                    op(method, x, out)
                graph.capture_end()
                for _ in range(3):
                    graph.replay()
                stream.synchronize()
                dist.barrier()
                start.record(stream)
                reps = 10
                for _ in range(reps):
                    graph.replay()
                end.record(stream)
                end.synchronize()
                row[f"{method}_graph_us"] = round(start.elapsed_time(end) * 1e3 / (reps * calls), 2)
                del graph
        results[str(nbytes)] = row
        if rank == 0:
            print(nbytes, row, flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(device), "gpus": world, "torch": torch.__version__,
                       "nccl": ".".join(map(str, torch.cuda.nccl.version())), "calls_per_timing": calls,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv),
                       "us_per_all_reduce": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--out", default="allreduce.json")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="message sizes in bytes, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"some of {','.join(METHODS)}")
    a = ap.parse_args()
    sizes, methods = [int(x) for x in a.sizes.split(",")], a.methods.split(",")
    if any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods {a.methods!r}: each must be one of {list(METHODS)}")
    mp.spawn(_run, args=(a.gpus, _free_port(), a.out, a.calls, sizes, methods), nprocs=a.gpus, join=True)


if __name__ == "__main__":
    main()
