"""What a results file says about the machine: card, library versions, measured copy bandwidth and GEMM rate,
and the latency floors they imply for a model (the "floor" rows of the results)."""
from __future__ import annotations

import platform
import time
from typing import Any

import torch

from ..kernels.tuning import device_slug

GPU_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 64 << 20


def card_name(device: torch.device) -> str:
    """The GPU's name, or "cpu: <model name>" (the CPU numbers are labelled, never passed off as a card's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu: {model}"


def card_slug(card: str) -> str:
    return device_slug(card)


def versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "triton": "not installed"}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def _time_best(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of fn() in seconds, after one warm-up; GPU work is bracketed by CUDA events."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def measure_copy_GBps(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth, counting the bytes read plus the bytes written."""
    nbytes = nbytes or (GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES)
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _time_best(lambda: dst.copy_(src), device, repeats)
    del src, dst
    return 2 * nbytes / seconds / 1e9


def measure_gemm_TFLOPs(device: torch.device, n: int | None = None, repeats: int = 10) -> tuple[float, str]:
    """Dense matmul rate: fp16 n=8192 on a GPU, fp32 n=1024 on a CPU (returned label says which)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _time_best(lambda: a @ b, device, repeats)
    del a, b
    return 2 * n**3 / seconds / 1e12, f"{str(dtype).removeprefix('torch.')} {n}x{n}x{n}"


def count_params(cfg: Any) -> int:
    """Parameters of a Llama-family causal LM from its HF config (embedding and LM head included)."""
    h, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    if getattr(cfg, "attention_bias", False):
        attn += heads * head_dim + 2 * kv_heads * head_dim + h
    layer = attn + 3 * h * inter + 2 * h
    head = 0 if getattr(cfg, "tie_word_embeddings", False) else vocab * h
    return vocab * h + cfg.num_hidden_layers * layer + h + head


def floors(params: int, bytes_per_param: int, copy_GBps: float, gemm_TFLOPs: float,
           lengths: list[int]) -> dict[str, Any]:
    """Decode floor = weight bytes / copy bandwidth; prefill floor(L) = max(decode floor, 2*params*L / GEMM rate)."""
    tpot_ms = params * bytes_per_param / (copy_GBps * 1e9) * 1e3
    ttft = {str(n): round(max(tpot_ms, 2 * params * n / (gemm_TFLOPs * 1e12) * 1e3), 4) for n in lengths}
    return {"copy_GBps": round(copy_GBps, 1), "gemm_TFLOPs": round(gemm_TFLOPs, 2), "tpot_ms": round(tpot_ms, 4),
            "ttft_ms": ttft, "params": params, "weight_bytes": params * bytes_per_param}


def measure_floors(device: torch.device, cfg: Any, dtype: torch.dtype, lengths: list[int]) -> dict[str, Any]:
    copy = measure_copy_GBps(device)
    gemm, gemm_label = measure_gemm_TFLOPs(device)
    out = floors(count_params(cfg), torch.finfo(dtype).bits // 8, copy, gemm, lengths)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the measurement buffers back before any system loads
    out["measured_on"] = device.type
    out["copy_method"] = "device-to-device copy_, read+write bytes, best of 10" + (
        "" if device.type == "cuda" else " (CPU memory; not a GPU number)")
    out["gemm_method"] = f"{gemm_label} matmul, best of 10" + ("" if device.type == "cuda" else " (CPU)")
    return out
