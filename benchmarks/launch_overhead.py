"""Host cost per call of the operations on the JIT path (what bounds the first request after load).

    PYTHONPATH=. python3 benchmarks/launch_overhead.py [--rows 100] [--json FILE]

For each operation, enqueues it `--iters` times back to back without synchronising and reports the host wall time
per call (median of 5 rounds); the GPU work of each is small enough that the queue never fills, so this is the time
Python + torch + the driver spend per call. Also reports a pure-Python loop, to compare hosts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from hybrid_engine.kernels import _triton, gemm, rms_norm
from hybrid_engine.kernels._triton import set_fast_launch


def per_call_us(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        rounds.append((time.perf_counter() - t) / iters * 1e6)
        torch.cuda.synchronize()
    return round(statistics.median(rounds), 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    m = args.rows
    x = torch.randn(m, 4096, device=dev, dtype=torch.float16)
    w_small = torch.randn(4096, 4096, device=dev, dtype=torch.float16) * 0.02
    w_qkv = torch.randn(12288, 4096, device=dev, dtype=torch.float16) * 0.02
    norm_w = torch.ones(4096, device=dev, dtype=torch.float16)
    out = torch.empty(m, 4096, device=dev, dtype=torch.float16)
    t0 = time.perf_counter()
    s = 0
    for i in range(1_000_000):
        s += i
    results = {"device": torch.cuda.get_device_name(), "rows": m,
               "python_loop_1e6_ms": round((time.perf_counter() - t0) * 1e3, 1)}
    cfg = (64, 64, 128, 4, 4)
    ops = {
        "torch.empty": lambda: torch.empty(m, 4096, device=dev, dtype=torch.float16),
        "x.view": lambda: x.view(m, 64, 64),
        "F.linear O (cuBLAS)": lambda: F.linear(x, w_small),
        "F.linear QKV (cuBLAS)": lambda: F.linear(x, w_qkv),
        "torch.mm out= O (cuBLAS)": lambda: torch.mm(x, w_small.t(), out=out),
        "linear_lt O (cuBLASLt)": lambda: gemm.linear_lt(x, w_small),
        "gemm_triton O": lambda: gemm.gemm_triton(x, w_small, config=cfg),
        "rms_norm_triton": lambda: rms_norm.rms_norm_triton(x, norm_w, 1e-5),
        "rms_norm_triton +res": lambda: rms_norm.rms_norm_triton(x, norm_w, 1e-5, out),
        "torch add": lambda: x + out,
    }
    for name, fn in ops.items():
        for fast in (False, True) if name.startswith(("gemm_triton", "rms_norm")) else (None,):
            label = name if fast is None else f"{name} ({'launch cache' if fast else 'triton.jit'})"
            if fast is not None:
                set_fast_launch(fast)
            results[label] = per_call_us(fn, args.iters)
            print(f"{results[label]:8.2f} us  {label}", flush=True)
    # the pieces of one cached launch (rms_norm's kernel, no residual)
    set_fast_launch(True)
    rms_norm.rms_norm_triton(x, norm_w, 1e-5)
    rms_norm.rms_norm_triton(x, norm_w, 1e-5)
    (kernel, rest), = [v for k, v in _triton._LAUNCHES.items()
                       if k[0] is rms_norm._rms_norm_kernel and ("HAS_RESIDUAL", False) in k[3]]
    largs = (x, x, norm_w, out, out, x.stride(0), x.stride(0), out.stride(0), out.stride(0), 4096, 1e-5)
    spec, vals = _triton.specialise(largs)
    get_device, get_stream, runtime = _triton._launch_api()
    dev_i = get_device()
    pieces = {
        "piece: specialise(11 args)": lambda: _triton.specialise(largs),
        "piece: get_current_device + get_current_stream": lambda: get_stream(get_device()),
        "piece: kernel.run (addresses)": lambda: kernel.run(m, 1, 1, get_stream(dev_i), kernel.function,
                                                            kernel.packed_metadata, None, None, None, *vals, *rest),
        "piece: kernel.run (tensors)": lambda: kernel.run(m, 1, 1, get_stream(dev_i), kernel.function,
                                                          kernel.packed_metadata, None, None, None, *largs, *rest),
    }
    for name, fn in pieces.items():
        results[name] = per_call_us(fn, args.iters)
        print(f"{results[name]:8.2f} us  {name}", flush=True)
    print(f"python loop 1e6: {results['python_loop_1e6_ms']} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
