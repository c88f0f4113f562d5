"""Why the swap-AB decode GEMM (kernels/decode_gemm.py) was slower than the one-row GEMV at M = 1: load variants of
its plain, split-K kernel, timed as the decode-GEMM sweep times (one CUDA graph of 20 calls on 20 weight copies).

    PYTHONPATH=. python benchmarks/decode_gemm_rows_probe.py            # variants x configs, M = 1, 2, 8, 16, 32
    PYTHONPATH=. python benchmarks/decode_gemm_rows_probe.py sweep      # masked rows over a wide grid, M = 1, 8, 32

Variants (XMODE, TMA, NOSPEC): XMODE 0 reads the rows past M as row M-1 again (the kernel as it was), 1 masks them
(zeros, no load: the kernel now); TMA 1 reads the weight through a host TensorDescriptor instead of pointers; NOSPEC
1 keeps Triton from specialising M == 1. Each variant is checked against the fp32 product and for batch invariance
(rows alone equal their rows of the 32-row call). Results: benchmarks/NOTES.md, 2026-12-02. The package's kernel
is not imported: this copy exists to compare load variants the package does not keep.
"""
import itertools
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hybrid_engine.kernels import decode_gemm as dg, gemv  # noqa: E402
from hybrid_engine.kernels.sweeps.timing import graph_us  # noqa: E402


def body(X, W, OUT, WS, COUNT, M, N, K, stride_xm, stride_wn, k_chunk, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, XMODE: tl.constexpr,
         TMA: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_chunk
    k_stop = tl.minimum(K, k_start + k_chunk)
    ks = k_start + tl.arange(0, BLOCK_K)
    if XMODE == 0:
        x_ptrs = X + tl.minimum(rows, M - 1).to(tl.int64)[:, None] * stride_xm + ks[None, :]
    else:
        x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    xmask = (rows < M)[:, None]
    if not TMA:
        w_ptrs = W + tl.minimum(cols, N - 1).to(tl.int64)[:, None] * stride_wn + ks[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(k_start, k_stop, BLOCK_K):
        if XMODE == 0:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=xmask, other=0.0)
        if TMA:
            w = W.load([pid_n * BLOCK_N, k0])
        else:
            w = tl.load(w_ptrs)
            w_ptrs += BLOCK_K
        acc = tl.dot(w, tl.trans(x), acc)
        x_ptrs += BLOCK_K
    acc = tl.trans(acc)
    last = pid_k == SPLIT_K - 1
    if SPLIT_K > 1:
        size = BLOCK_M * BLOCK_N
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile = pid_m * (tl.num_programs(0) // num_pid_m) + pid_n
        base = WS + tile.to(tl.int64) * (SPLIT_K * size)
        tl.store(base + pid_k * size + offs, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(COUNT + tile, 1, sem="acq_rel")
        last = arrived == SPLIT_K - 1
        if last:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(base + s * size + offs, cache_modifier=".cg")
            tl.atomic_xchg(COUNT + tile, 0)
    if last:
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(OUT + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


K_SPEC = triton.jit(body)
K_NOSPEC = triton.jit(body, do_not_specialize=["M"])
_DESC = {}
_WS = {}


def run(x, w, cfg, xmode, tma, nospec, pdl):
    bn, bk, split, nw, ns = cfg
    m, k = x.shape
    n = w.shape[0]
    k_chunk = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_chunk)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    key = (split, bn, n)
    if key not in _WS:
        _WS[key] = (torch.empty(2 * n * split * 16, device=x.device, dtype=torch.float32),
                    torch.zeros(2 * triton.cdiv(n, bn), device=x.device, dtype=torch.int32))
    ws, count = _WS[key]
    if tma:
        dk = (w.data_ptr(), bn, bk)
        if dk not in _DESC:
            _DESC[dk] = TensorDescriptor.from_tensor(w, [bn, bk])
        wa = _DESC[dk]
    else:
        wa = w
    kern = K_NOSPEC if nospec else K_SPEC
    kw = {"launch_pdl": True} if pdl else {}
    kern[(triton.cdiv(m, 16) * triton.cdiv(n, bn), split)](
        x, wa, out, ws, count, m, n, k, x.stride(0), w.stride(0), k_chunk, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
        SPLIT_K=split, XMODE=xmode, TMA=tma, PDL=pdl, num_warps=nw, num_stages=ns, **kw)
    return out


SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}
CONFIGS = {"qkv": [(64, 128, 1, 4, 3), (64, 128, 1, 4, 4), (128, 128, 4, 4, 2)],
           "o": [(64, 128, 4, 4, 4), (64, 128, 2, 4, 4), (128, 128, 8, 4, 3)],
           "gate_up": [(64, 128, 1, 4, 3), (64, 128, 1, 4, 4), (128, 128, 2, 4, 3)],
           "down": [(64, 128, 4, 4, 4), (64, 256, 4, 4, 3), (128, 128, 8, 4, 3)],
           "lm_head": [(64, 128, 1, 4, 4), (128, 128, 1, 4, 3)]}
VARIANTS = [(0, 0, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0), (1, 1, 1)]  # (XMODE, TMA, NOSPEC)
MS = (1, 2, 8, 16, 32)


def main():
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else list(SHAPES)  # e.g. "qkv,o"
    pdl = int(os.environ.get("PROBE_PDL", "1"))
    out = {"pdl": pdl, "shapes": {}}
    t0 = time.time()
    torch.manual_seed(0)
    for name in only:
        n, k = SHAPES[name]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(20)]
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in MS}
        res = out["shapes"][name] = {"gemv": graph_us(lambda i: gemv.gemv_triton(xs[1], ws[i], None, None)),
                                     "gbytes": n * k * 2 / 1e9, "t": {}}
        ref = xs[32].float() @ ws[0].float().t()
        for cfg, var in itertools.product(CONFIGS[name], VARIANTS):
            label = f"{cfg} x{var[0]} tma{var[1]} nospec{var[2]}"
            try:
                o32 = run(xs[32], ws[0], cfg, *var, pdl)
                err = (o32.float() - ref).abs().max().item()
                inv = all(torch.equal(run(xs[32][i:i + 1], ws[0], cfg, *var, pdl), o32[i:i + 1]) for i in (0, 13, 31))
                tm = {m: graph_us(lambda i, m=m: run(xs[m], ws[i], cfg, *var, pdl)) for m in MS}
                res["t"][label] = {"err": err, "invariant": inv, "us": tm}
                print(f"{name:8} {label:44} err {err:.2e} inv {inv} " +
                      " ".join(f"{m}:{v:6.2f}" for m, v in tm.items()) + f"  gemv {res['gemv']:.2f}", flush=True)
            except Exception as e:  # noqa: BLE001
                res["t"][label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"{name:8} {label:44} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        print(f"-- {name} done at {time.time() - t0:.0f} s", flush=True)
        del ws
    path = os.path.join(os.environ.get("OUT", "."), f"probe_pdl{pdl}.json")
    json.dump(out, open(path, "w"), indent=1)




def sweep():
    """XMODE=1 over a wide grid: M = 1, 8, 32."""
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(SHAPES)
    out = {}
    torch.manual_seed(0)
    for name in only:
        n, k = SHAPES[name]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(20)]
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in (1, 8, 32)}
        g = graph_us(lambda i: gemv.gemv_triton(xs[1], ws[i], None, None))
        res = out[name] = {"gemv": g, "t": {}}
        for bn, bk, split, nw, ns in itertools.product((64, 128), (64, 128, 256), (1, 2, 4, 8), (4, 8), (2, 3, 4, 5)):
            if split > 1 and k / split < 2 * bk:
                continue
            if (16 + bn) * bk * 2 * ns > 200 * 1024 or (nw == 8 and bn * bk < 16384):
                continue
            cfg = (bn, bk, split, nw, ns)
            try:
                tm = {m: graph_us(lambda i, m=m: run(xs[m], ws[i], cfg, 1, 0, 0, 1)) for m in (1, 8, 32)}
            except Exception as e:  # noqa: BLE001 - a config may not fit (shared memory) or compile
                res.setdefault("failed", {})[str(cfg)] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            res["t"][str(cfg)] = tm
        best = sorted(res["t"].items(), key=lambda kv: kv[1][1])[:6]
        print(f"{name} gemv {g:.2f}", flush=True)
        for c, tm in best:
            print(f"   {c:28} " + " ".join(f"{m}:{v:6.2f}" for m, v in tm.items()), flush=True)
        del ws
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "sweep_x1.json"), "w"), indent=1)


if __name__ == "__main__":
    sweep() if sys.argv[1:2] == ["sweep"] else main()
