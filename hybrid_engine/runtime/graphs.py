"""CUDA graphs for the static parts of a step, captured by a background worker while the engine serves.

`CaptureWorker` decides what to capture and when (device-independent, unit-tested on the CPU); `GraphRunner` owns
the CUDA graphs: one decode graph per batch bucket (key ("decode", rows)), one prefill graph per length bucket (key:
the bucket) and, with prefix caching, one prefill-after-cached-positions graph per bucket of new tokens (key
("prefill_ctx", bucket); the start is read from a device buffer, so one graph serves any cached prefix) and one for a
long prompt's non-final chunks (key ("prefill_ctx_part", the chunk size's bucket): the same step without sampling
or installing the sequence; its final chunk replays the "prefill_ctx" graph), all in one memory pool. Batches with
grammar-constrained rows run the decode step in two halves, each a graph per bucket (keys ("decode_forward", rows)
and ("decode_sample", rows)), captured once such a batch has asked for them.

Rules from DESIGN.md that this module and the serving path obey while a capture may be running:
- capture with capture_error_mode="thread_local" on the worker's own stream, via CUDAGraph.capture_begin/end
  (torch.cuda.graph() would run a device-wide synchronize and empty_cache first);
- the serving thread runs on its own (non-default) stream and waits only on its own events;
- sampling draws from a counter-based hash, never torch's global generator;
- the worker pauses between decoder layers while a request is in flight (GIL released), so a request that arrives
  mid-capture does not share the host with it;
- every graph's kernels run once outside any capture first (warm-up on scratch buffers that write only to a
  reserved scratch KV block), so Triton compiles nothing during a capture.
"""
from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
import weakref
from collections import Counter
from typing import Any, Callable, Iterable

import torch

from . import _gc, cuda_driver
from ..kernels import gemm
from ..kernels._workspace import reserve_for_capture
from ..models.llama import between_layers

logger = logging.getLogger(__name__)

DECODE = "decode"
CONTEXT = "prefill_ctx"
CONTEXT_PART = "prefill_ctx_part"  # a non-final chunk of a long prompt: KV written, nothing sampled
DECODE_FORWARD, DECODE_SAMPLE = "decode_forward", "decode_sample"  # the two halves of a constrained decode step
_DECODE_KINDS = (DECODE, DECODE_FORWARD, DECODE_SAMPLE)


def is_decode(key: Any) -> bool:
    return isinstance(key, tuple) and key[0] in _DECODE_KINDS


def is_context(key: Any) -> bool:
    """A prefill after cached positions: a "prefill_ctx" or "prefill_ctx_part" key."""
    return isinstance(key, tuple) and key[0] in (CONTEXT, CONTEXT_PART)


def decode_buckets(max_num_seqs: int, chosen: tuple[int, ...] | None = None) -> list[int]:
    """Batch buckets that get a decode graph: `chosen` (EngineConfig.decode_buckets, sizes below max_num_seqs) or
    the powers of two below max_num_seqs, then max_num_seqs itself. A step pads up to the smallest bucket >= its
    rows."""
    if chosen is None:
        out, b = [], 1
        while b < max_num_seqs:
            out.append(b)
            b *= 2
        return out + [max_num_seqs]
    return sorted({b for b in chosen if b < max_num_seqs} | {max_num_seqs})
_LIVE_WORKERS: "weakref.WeakSet[CaptureWorker]" = weakref.WeakSet()


@atexit.register
def _stop_workers_at_exit() -> None:
    """Join capture threads before the interpreter finalizes: a daemon thread frozen inside a CUDA call aborts."""
    for worker in list(_LIVE_WORKERS):
        worker.stop(timeout=60.0)


class CaptureWorker:
    """Schedules captures, one at a time: decode buckets first, then prefill buckets by observed demand, then the
    ladder.

    policy "idle": capture only while no request is in flight (a request arriving mid-capture is served at once;
    the capture in progress finishes). Under sustained load there is no such window: once a key some request asked
    for has waited `starve_s` since it was first asked for (or since the last capture), `starved_key` names it, and
    the serving thread captures it between two steps (`GraphRunner.capture_if_starved`), the running streams
    waiting for that one capture. "eager": capture everything now, before serving. A failed capture is logged,
    counted and never retried; the engine keeps serving that shape on the JIT path.
    """

    def __init__(self, keys: Iterable[Any], capture: Callable[[Any], None], policy: str = "idle",
                 quiet_s: float = 0.25, on_demand: Iterable[Any] = (), starve_s: float = 2.0) -> None:
        self.ladder = list(keys)
        # keys captured only once something asked for them (graphs that many engines never use)
        self.on_demand = set(on_demand) if policy != "eager" else set()
        self.quiet_s = quiet_s  # an idle window starts this long after the last request (or load) ended
        self.starve_s = starve_s  # a demanded key waits at most about this long for an idle window
        self._wanting_since: float | None = None  # when a demanded key last started waiting (None: none waits)
        self._last_busy = time.monotonic()
        self._capture = capture
        self.policy = policy
        self.captured: set[Any] = set()
        self.failed: dict[Any, str] = {}
        self.demand: Counter = Counter()
        self._busy = False
        self._done = False  # set once nothing is pending or capturing (keys are fixed, failures never retried)
        self._stop = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.capturing: Any = None

    # -- scheduling --
    def pending(self) -> list[Any]:
        """Keys not yet captured or failed, in capture order."""
        rest = [k for k in self.ladder if k not in self.captured and k not in self.failed
                and (k not in self.on_demand or self.demand[k])]
        return sorted(rest, key=lambda k: (not is_decode(k), -self.demand[k], self.ladder.index(k)))

    def record_demand(self, key: Any) -> None:
        with self._cond:
            self.demand[key] += 1
            if self._wanting_since is None and key not in self.captured and key not in self.failed:
                self._wanting_since = time.monotonic()
            if key in self.on_demand and self.demand[key] == 1:
                self._done = False  # a new key is pending: set_busy(False) must wake the worker again
            if not self._busy:  # mid-request the worker would only wake to wait again, taking the GIL from the
                self._cond.notify_all()  # request's JIT path (host-bound); it reads the demand when idle

    def set_busy(self, busy: bool) -> None:
        if self._done:  # every key captured or failed: nothing waits on the flag, so no lock or wake-up (on the
            self._busy = busy  # request's critical path, twice per request)
            self._last_busy = time.monotonic()
            return
        with self._cond:
            self._busy = busy
            self._last_busy = time.monotonic()
            if not busy and (self.pending() or self.capturing is not None):  # only busy -> idle with work left (or a
                self._cond.notify_all()  # paused capture) wakes the worker: otherwise it would take the GIL for nothing

    def _pause_while_busy(self) -> None:
        """Between two decoder layers of a capture (or its warm-up run) on the worker thread: while a request is in
        flight, wait with the GIL released, so the request's host work (the JIT path is host-bound) runs as if no
        capture were open; the capture goes on when the request ends. Pausing in Python is harmless to the capture:
        it records launches on the worker's own stream in thread-local mode."""
        if not self._busy:
            return
        with self._cond:
            while self._busy and not self._stop:
                self._cond.wait()

    def starved_key(self) -> Any:
        """The key to capture between two steps on the serving thread, or None: a key some request asked for has
        waited `starve_s` without an idle window (policy "idle", nothing capturing). Called every step: lock-free
        until the wait is long enough."""
        since = self._wanting_since
        if since is None or self.policy != "idle" or self.capturing is not None:
            return None
        if time.monotonic() - since < self.starve_s:
            return None
        with self._cond:
            wanted = [k for k in self.pending() if self.demand[k]]
            if not wanted:
                self._wanting_since = None
            return wanted[0] if wanted and self.capturing is None else None

    # -- running --
    def run_one(self, key: Any) -> None:
        """Capture `key` now, in this thread (if it is still pending)."""
        if key in self.pending():
            self._capture_one(key)

    def run_all(self) -> None:
        """Capture every pending key in this thread (policy "eager")."""
        for key in self.pending():
            self._capture_one(key)

    def start(self) -> None:
        if self.policy == "eager":
            self.run_all()
            return
        with self._cond:  # the first idle window starts when loading ends (a request right after load never
            self._last_busy = time.monotonic()  # shares the GIL or the GPU with a capture)
        self._thread = threading.Thread(target=self._loop, name="hybrid-engine-capture", daemon=True)
        _LIVE_WORKERS.add(self)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float = 600.0) -> bool:
        """Block until nothing is pending (tests, benchmarks); True if everything was attempted."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.pending() or self.capturing is not None:
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())) and \
                        time.monotonic() >= deadline:
                    return False
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                key = self._wait_for_idle_window()
                if key is None:
                    return
            self._capture_one(key)

    def _wait_for_idle_window(self) -> Any:
        """Under the lock: the next key once no request has been in flight for quiet_s; None when stopping."""
        while not self._stop:
            quiet_left = self._last_busy + self.quiet_s - time.monotonic()
            if self._busy or not self.pending() or self.capturing is not None:  # (one capture at a time)
                self._cond.wait()
            elif quiet_left > 0:
                self._cond.wait(timeout=quiet_left)
            else:
                return self.pending()[0]
        return None

    def _capture_one(self, key: Any) -> None:
        with self._cond:
            if self.capturing is not None:  # the other thread is capturing: one capture at a time
                return
            self.capturing = key
        t0 = time.perf_counter()
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, 2e-4))  # a request arriving mid-capture gets the GIL within 0.2 ms
        # only the worker thread pauses: run_one/run_all run on the serving thread, which must never wait for itself
        pause = self._pause_while_busy if threading.current_thread() is self._thread else None
        try:
            with between_layers(pause):
                self._capture(key)
        except Exception as exc:  # any failure leaves the engine on the JIT path for this key
            logger.warning("CUDA graph capture of %r failed; serving it on the JIT path: %s", key, exc)
            with self._cond:
                self.failed[key] = f"{type(exc).__name__}: {exc}"
        else:
            with self._cond:
                self.captured.add(key)
            logger.info("captured %r in %.0f ms", key, (time.perf_counter() - t0) * 1e3)
        finally:
            sys.setswitchinterval(switch)
            with self._cond:
                self.capturing = None
                rest = self.pending()
                done = self._done = not rest
                self._wanting_since = time.monotonic() if any(self.demand[k] for k in rest) else None  # from now
                self._cond.notify_all()
            if done:  # the graphs and what their captures made: frozen out of later collections (_gc.py)
                _gc.freeze()


class GraphRunner:
    """The engine's CUDA graphs. `ready_prefill_bucket`/`replay_*` are called by the serving thread."""

    def __init__(self, runner: Any, buckets: Iterable[int], policy: str, serve_stream: torch.cuda.Stream,
                 context_buckets: bool = False, chunk_size: int | None = None,
                 batch_buckets: tuple[int, ...] | None = None) -> None:
        self.runner = runner
        self.buckets = sorted(b for b in buckets if b <= runner.max_model_len)
        self.context_buckets = context_buckets
        contexts = [(CONTEXT, b) for b in self.buckets] if context_buckets else []
        part = self.bucket_for(chunk_size) if context_buckets and chunk_size else None
        self.part_bucket = part  # the bucket of a long prompt's non-final chunks (None: they run on the JIT path)
        contexts += [(CONTEXT_PART, part)] if part is not None else []
        self.decode_buckets = decode_buckets(runner.max_num_seqs, batch_buckets)
        self.pool = torch.cuda.graph_pool_handle()
        self.all_pools = [self.pool]
        self.graphs: dict[Any, torch.cuda.CUDAGraph] = {}
        self._execs: dict[Any, int] = {}  # their instantiated cudaGraphExec_t handles
        self._device_index = torch.device(runner.device).index
        if self._device_index is None:
            self._device_index = torch.cuda.current_device()
        self.serve_stream = serve_stream
        self.capture_stream = torch.cuda.Stream(runner.device)
        split = [(kind, b) for b in self.decode_buckets for kind in (DECODE_FORWARD, DECODE_SAMPLE)]
        self.worker = CaptureWorker([*((DECODE, b) for b in self.decode_buckets), *split, *self.buckets, *contexts],
                                    self._capture, policy, on_demand=split)
        self.pool_bytes = 0
        self._scratch: Any = None  # warm-up buffers of the worker, made on its first capture
        self._scratch_logits: Any = None  # and the logits buffer its split halves use
        self.fail_next_capture = False  # test hook: the next capture raises inside the capture

    def start(self) -> None:
        """Decode graphs at load for "idle" (every request needs them; ~0.1 s each once kernels are warm), so no
        request shares the GIL with their capture and batches are graphed under sustained load, which has no idle
        window; prefill buckets then follow in the background."""
        if self.worker.policy == "idle":
            for b in self.decode_buckets:
                self.worker.run_one((DECODE, b))
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def release(self) -> None:
        """Destroy every graph now (after `stop`, with no replay in flight): their memory goes back to the pool, and
        a NCCL communicator whose collectives they captured can then be torn down (NCCL waits for the graphs that
        hold its collectives to be destroyed first)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self._execs.clear()

    # -- serving side --
    def bucket_for(self, length: int) -> int | None:
        return next((b for b in self.buckets if b >= length), None)

    def _ready(self, bucket: int | None, key: Any) -> int | None:
        """`bucket` if its graph `key` is captured, else None (demand recorded; None too for no bucket)."""
        if bucket is None:
            return None
        if key not in self.worker.captured:
            self.worker.record_demand(key)
            return None
        return bucket

    def ready_decode_bucket(self, rows: int) -> int | None:
        bucket = next((b for b in self.decode_buckets if b >= rows), None)
        return self._ready(bucket, (DECODE, bucket))

    def ready_split_bucket(self, rows: int) -> int | None:
        """The bucket whose forward and sample graphs are both captured (else None, and both are asked for)."""
        bucket = next((b for b in self.decode_buckets if b >= rows), None)
        if bucket is None:
            return None
        keys = ((DECODE_FORWARD, bucket), (DECODE_SAMPLE, bucket))
        missing = [k for k in keys if k not in self.worker.captured]
        for key in missing:
            self.worker.record_demand(key)
        return None if missing else bucket

    def ready_prefill_bucket(self, length: int) -> int | None:
        bucket = self.bucket_for(length)
        return self._ready(bucket, bucket)

    def ready_context_bucket(self, length: int) -> int | None:
        """The captured bucket for `length` new tokens after cached positions, or None (demand recorded)."""
        bucket = self.bucket_for(length) if self.context_buckets else None
        return self._ready(bucket, (CONTEXT, bucket))

    def ready_part_bucket(self, length: int) -> int | None:
        """The captured bucket for a non-final chunk of `length` tokens, or None (demand recorded where one exists)."""
        bucket = self.part_bucket if self.part_bucket is not None and length <= self.part_bucket else None
        return self._ready(bucket, (CONTEXT_PART, bucket))

    def replay_prefill(self, bucket: int) -> None:
        self._replay(bucket)

    def replay_context_prefill(self, bucket: int) -> None:
        self._replay((CONTEXT, bucket))

    def replay_context_part(self, bucket: int) -> None:
        self._replay((CONTEXT_PART, bucket))

    def replay_decode(self, bucket: int) -> None:
        self._replay((DECODE, bucket))

    def replay_decode_forward(self, bucket: int) -> None:
        self._replay((DECODE_FORWARD, bucket))

    def replay_decode_sample(self, bucket: int) -> None:
        self._replay((DECODE_SAMPLE, bucket))

    def _replay(self, key: Any) -> None:
        """On the current stream: the graph's launch through the driver (cuda_driver.py: ~10 us less host time and
        no philox-prologue kernels), else CUDAGraph.replay()."""
        if cuda_driver.available():
            cuda_driver.graph_launch(self._execs[key], self._device_index)
        else:
            self.graphs[key].replay()

    def capture_if_starved(self) -> None:
        """Between two steps, on the serving thread: capture the graph a request asked for that has waited too long
        for an idle window (sustained load); the running streams wait for this one capture (~0.1-0.3 s for a 7B
        shape). Nothing until a demanded key has waited `CaptureWorker.starve_s`."""
        key = self.worker.starved_key()
        if key is not None:
            logger.info("capturing %r between steps: no idle window for %.1f s", key, self.worker.starve_s)
            self.worker.run_one(key)

    def notify_busy(self) -> None:
        self.worker.set_busy(True)

    def notify_idle(self) -> None:
        self.worker.set_busy(False)

    def stats(self) -> dict[str, Any]:
        w = self.worker
        return {"graphs_captured": len(w.captured), "graphs_pending": len(w.pending()),
                "graphs_failed": len(w.failed), "graph_pool_bytes": self.pool_bytes,
                "graphs": sorted(str(k) for k in w.captured), "graph_failures": dict(w.failed),
                "capturing": w.capturing is not None}

    # -- worker side --
    def _step_fn(self, key: Any, buf: Any, logits: Any = None) -> Callable[[], None]:
        """The step a key's graph holds, on `buf` (and, for a split half, the logits buffer `logits`)."""
        if is_context(key):
            return lambda: self.runner.prefill_step(key[1], buf, context=True, final=key[0] == CONTEXT)
        if not is_decode(key):
            return lambda: self.runner.prefill_step(key, buf)
        kind, rows = key
        if kind == DECODE_FORWARD:
            return lambda: self.runner.decode_forward_step(rows, buf, logits)
        if kind == DECODE_SAMPLE:
            return lambda: self.runner.decode_sample_step(rows, buf, logits)
        return lambda: self.runner.decode_step(rows, buf)

    @torch.inference_mode()
    def _capture(self, key: Any) -> None:
        stream = self.capture_stream
        with torch.cuda.stream(stream), gemm.graph_plan():
            # warm-up on this stream first: cuBLAS sets up its per-stream workspace and Triton compiles any new
            # variant outside the capture (without it the first capture on this stream is invalidated)
            if self._scratch is None:
                self._scratch = self.runner.scratch_buffers()
                self._scratch_logits = torch.zeros_like(self.runner.logits)
            scratch = self._scratch
            scratch.valid_len.fill_(1 if is_decode(key) else key[1] if is_context(key) else key)
            with reserve_for_capture():  # the split kernels' graph-side buffers, made and zeroed here, not in the pool
                self._step_fn(key, scratch, self._scratch_logits)()
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                if self.fail_next_capture:
                    self.fail_next_capture = False
                    raise RuntimeError("injected capture failure (test hook)")
                self._step_fn(key, self.runner.buf, self.runner.logits)()
            except BaseException:
                self._abandon_capture(graph)
                raise
            graph.capture_end()
            stream.synchronize()
        self._execs[key] = graph.raw_cuda_graph_exec()
        self.graphs[key] = graph
        self.pool_bytes = _pool_bytes(self.all_pools)


    def _abandon_capture(self, graph: torch.cuda.CUDAGraph) -> None:
        """End a failed capture and move later captures to a fresh pool: the allocator may still consider the old
        pool as recording, which would fail every later capture ("already recording to mempool_id")."""
        try:
            graph.capture_end()
        except Exception as exc:  # an invalidated capture cannot end cleanly; the stream is usable afterwards
            logger.debug("capture_end after a failed capture: %s", exc)
        self.pool = torch.cuda.graph_pool_handle()
        self.all_pools.append(self.pool)


def _pool_bytes(pools: list[Any]) -> int:
    """Bytes of device memory held by segments of the graphs' private pools."""
    try:
        segments = torch.cuda.memory_snapshot()
    except Exception:  # snapshot unsupported: report 0 rather than a guess
        return 0
    ids = {tuple(p) for p in pools}
    return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", ())) in ids)
