"""The few CUDA calls on a request's critical path, made through the driver API (ctypes) instead of torch.

Measured with line_profiler on the H100 host (benchmarks/host_path.py, 2026-11-27): torch spends 20-40 us of host time
on a 2 KB pinned host-to-device `copy_` (dispatch, TensorIterator, and an event the pinned-memory allocator records
per copy), 10-20 us on `CUDAGraph.replay()` (which also launches two small fill kernels per replay for the default
generator's philox seed and offset, although no graph here draws from it), 8-15 us on the token's device-to-host
copy and 4-8 us on an event record. Here each is one ctypes call into libcuda (~1-3 us), on the thread's *current*
stream, exactly as the torch call would be. Host time before a replay launch is what a slow-CPU burst on the host
multiplies (benchmarks/NOTES.md, 2026-11-27), so it is kept small.

What the torch calls did and these do not, and why that is safe here:
- the copies record no event in torch's pinned-memory allocator: the engine's pinned buffers are never freed while
  it serves, and each is rewritten only after the step that read it has been waited for;
- a graph launch skips the philox prologue: sampling draws from its own counter-based hash, never from torch's
  generator (kernels/sampling.py), so no graph advances that state.

`available()` is False on a CPU-only torch, without libcuda, or with HYBRID_ENGINE_DRIVER_CALLS=0; callers then use
the torch calls. `set_enabled` switches it for A/B benchmarks and tests.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Any

import torch

_ENABLED = os.environ.get("HYBRID_ENGINE_DRIVER_CALLS", "1").lower() not in ("0", "false", "off", "no")
_local = threading.local()
_u64, _size, _ptr = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p


@functools.cache
def _lib() -> Any:
    """libcuda with the signatures used here, or None."""
    if not torch.cuda.is_available() or not hasattr(torch._C, "_cuda_getCurrentRawStream"):
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        sigs = {"cuGraphLaunch": (_ptr, _ptr), "cuEventRecord": (_ptr, _ptr),
                "cuMemcpyHtoDAsync_v2": (_u64, _ptr, _size, _ptr), "cuMemcpyDtoHAsync_v2": (_ptr, _u64, _size, _ptr),
                "cuCtxGetCurrent": (ctypes.POINTER(_ptr),), "cuCtxSetCurrent": (_ptr,),
                "cuDeviceGet": (ctypes.POINTER(ctypes.c_int), ctypes.c_int),
                "cuDevicePrimaryCtxRetain": (ctypes.POINTER(_ptr), ctypes.c_int),
                "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p))}
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


def available() -> bool:
    return _ENABLED and _lib() is not None


def set_enabled(enabled: bool) -> bool:
    """Turn the driver calls on or off (process-wide); returns the previous setting."""
    global _ENABLED
    prev, _ENABLED = _ENABLED, bool(enabled)
    return prev


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _lib().cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {(name.value or b'?').decode()} ({result})")


def _stream(device_index: int) -> int:
    """The current stream's handle on this thread, with the device's primary context made current on a thread that
    has none yet (the driver API, unlike the runtime, does not bind it by itself)."""
    if getattr(_local, "device", None) != device_index:
        lib, ctx = _lib(), _ptr()
        _check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            dev = ctypes.c_int()
            _check(lib.cuDeviceGet(ctypes.byref(dev), device_index), "cuDeviceGet")
            _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            _check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        _local.device = device_index
    return torch._C._cuda_getCurrentRawStream(device_index)


def copy_to_device(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src, non_blocking=True) for a pinned contiguous host `src` and a contiguous device `dst` of equal
    size, on the current stream."""
    _copy("cuMemcpyHtoDAsync_v2", dst, src, dst.device.index)


def copy_to_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src, non_blocking=True) for a contiguous device `src` and a pinned contiguous host `dst` of equal
    size, on the current stream."""
    _copy("cuMemcpyDtoHAsync_v2", dst, src, src.device.index)


def _copy(name: str, dst: torch.Tensor, src: torch.Tensor, device_index: int) -> None:
    nbytes = src.numel() * src.element_size()
    stream = _stream(device_index)
    _check(getattr(_lib(), name)(dst.data_ptr(), src.data_ptr(), nbytes, stream), name)


def record(event: torch.cuda.Event, device_index: int) -> None:
    """event.record() on the current stream (the event is created on first record, as torch does)."""
    if event.cuda_event == 0:  # torch creates the CUDA event lazily on its first record
        event.record()
        return
    _check(_lib().cuEventRecord(event.cuda_event, _stream(device_index)), "cuEventRecord")


def graph_launch(graph_exec: int, device_index: int) -> None:
    """Launch an instantiated graph (`CUDAGraph.raw_cuda_graph_exec()`) on the current stream."""
    _check(_lib().cuGraphLaunch(graph_exec, _stream(device_index)), "cuGraphLaunch")
