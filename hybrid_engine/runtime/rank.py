"""What one GPU (one tensor-parallel rank) holds: its model shard, kernels, KV cache, step runner and CUDA graphs.

`build_rank` is the one place these are made, by the engine for rank 0 and by every tensor-parallel worker process
for its own rank (distributed/worker.py), with the same steps in the same order: every collective at load (the KV
block count, warm-up steps, graph captures) then matches across ranks.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _gc
from ..config import EngineConfig
from ..kernels import get_ops
from ..models import loader
from .kv_cache import PagedKVCache, num_blocks_for
from .runner import ModelRunner

logger = logging.getLogger(__name__)

# "auto" makes the prefill weight copy when it takes at most this fraction of the device memory free after loading
PREFILL_COPY_MAX_FREE_FRACTION = 0.25


@dataclass(slots=True)
class Rank:
    loaded: loader.LoadedModel
    ops: Any
    kv: PagedKVCache
    runner: ModelRunner
    graphs: Any  # graphs.GraphRunner or None
    stream: torch.cuda.Stream | None  # the serving stream (CUDA)
    num_blocks: int
    prefill_weight_copy_bytes: int
    load_s: dict[str, float]  # wall seconds of each load phase (see `build_rank`)


def build_rank(cfg: EngineConfig, device: torch.device, tp: tuple[int, int] = (0, 1), comm: Any = None,
               need_tokenizer: bool = True) -> Rank:
    """Load rank `tp[0]`'s shard (of tp[1]), size the KV cache (the smallest count any rank can hold), warm up and
    start the graph captures (under tensor parallelism every capture happens here, in a fixed order). Times its
    phases into `Rank.load_s`: model (config, tokenizer, weights on the device; "model.config", "model.weights"
    and "model.tokenizer" are its parts as the loader timed them, without waiting for the device), kv_and_runner
    (kernels, prefill weight copies, KV cache, step buffers), compile (the parallel compile pass; an empty cache only),
    warm_up (every kernel variant run once), graphs (the decode graphs taken at load, or every graph under
    tensor parallelism / capture="eager")."""
    clock = _PhaseClock(device)
    loaded = loader.load(cfg.model, cfg.tokenizer, _resolve_dtype(cfg.dtype), device, cfg.max_model_len, cfg.seed,
                         cfg.gguf_file, tp=tp, need_tokenizer=need_tokenizer)
    model = loaded.model
    model.set_comm(comm)
    dtype = model.embed_tokens.weight.dtype
    clock.mark("model")
    clock.phases.update({f"model.{k}": v for k, v in loaded.phases_s.items()})  # parts of "model", not added to it
    ops = get_ops(device, cfg.attention_backend, batch_invariant=cfg.batch_invariant)
    copy_bytes = _prefill_weight_copies(cfg.prefill_weight_copy, model, device)
    n_blocks = cfg.num_kv_blocks or num_blocks_for(model, cfg.block_size, loaded.max_model_len, cfg.max_num_seqs,
                                                   dtype, device, cfg.gpu_memory_utilization)
    if comm is not None:
        n_blocks = comm.min_int(n_blocks)
    kv = PagedKVCache(model, n_blocks, cfg.block_size, loaded.max_model_len, dtype, device)
    _check_kv_fits(n_blocks, kv.max_blocks_per_seq, loaded.max_model_len, cfg.block_size)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    # grammar bitmasks cover the tokenizer's vocabulary where it is larger than the logits (the same on every rank)
    mask_vocab = loaded.tokenizer_size()  # known before the tokenizer is made (models/loader.load_overlapped)
    if comm is not None:
        mask_vocab = comm.max_int(mask_vocab)
    runner = ModelRunner(model, kv, ops, loaded.max_model_len, cfg.max_num_seqs, device, mask_vocab=mask_vocab)
    # Once, at load: what is alive now is frozen out of later collections (see _gc.py). Before the warm-up and
    # the decode captures, so that load ends with GPU work, not with a collection (~0.1-0.3 s) on an idle GPU.
    gc.collect()
    _gc.freeze()
    clock.mark("kv_and_runner")
    graphs = None
    if device.type == "cuda":
        from ..kernels._triton import compile_only, compile_workers, warm_cache_marker
        from .graphs import decode_buckets

        rows = tuple(decode_buckets(cfg.max_num_seqs, cfg.decode_buckets))
        marker = warm_cache_marker(warm_up_material(cfg, model, rows, loaded.max_model_len, device))
        warm = marker.exists()  # this kernel set is in Triton's cache: nothing to compile ahead
        if comm is not None:  # every rank takes the same passes: their steps carry collectives, in the same order
            warm = bool(comm.min_int(int(warm)))
        # the graph captures' own variants: none without graphs; with a warm cache left to each capture's own
        # warm-up run (which then only loads them from the cache), not compiled into the load
        graph_plan = cfg.capture != "off" and not warm
        projections = _start_projection_warm_up(model, min(max(cfg.prefill_buckets), loaded.max_model_len), device)
        with torch.cuda.stream(stream):
            with compile_only(0 if warm else compile_workers()) as compiling:  # an empty cache: compiled at once
                if compiling:
                    runner.warm_up(decode_rows=rows, graph_plan=graph_plan)
            clock.mark("compile")
            runner.warm_up(decode_rows=rows, graph_plan=graph_plan)  # then each runs once, compiling nothing
        clock.phases["warm_up.projections"] = projections()  # its own time: it ran beside the passes
        stream.synchronize()
        clock.mark("warm_up")
        _touch(marker)
    if loaded.pending is not None:  # transformers' config and the tokenizer, made on a thread meanwhile
        loaded.finish()
        _gc.freeze()  # what that thread imported joins the frozen objects (no second collection: its garbage is small)
        clock.mark("transformers_wait")
    if cfg.capture == "eager" and device.type != "cuda":
        logger.warning("capture='eager' needs a CUDA device; on %s nothing is captured (as 'off')", device)
    if cfg.capture != "off" and device.type == "cuda":
        from .graphs import GraphRunner

        # tensor parallelism: every rank captures the same graphs in the same order, before serving (a background
        # capture decided per rank could order the graphs' collectives differently and deadlock them)
        policy = "eager" if tp[1] > 1 else cfg.capture
        graphs = GraphRunner(runner, cfg.prefill_buckets, policy, stream, context_buckets=cfg.enable_prefix_caching,
                             chunk_size=cfg.prefill_chunk_size, batch_buckets=cfg.decode_buckets)
        runner.graphs = graphs
        graphs.start()
        clock.mark("graphs", wait=False)  # the capture worker may be running: no device-wide wait from here on
    logger.info("load phases (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in clock.phases.items()))
    return Rank(loaded, ops, kv, runner, graphs, stream, n_blocks, copy_bytes, clock.phases)


def _start_projection_warm_up(model: Any, max_rows: int, device: torch.device) -> Any:
    """`llama_jit.warm_projections` (cuBLAS's first call at each row count of the JIT path's products) on a thread
    and a stream of its own, beside the compile and warm-up passes (torch releases the GIL inside each product).
    Returns a function that waits for it and gives its seconds. An error is logged, not raised: it only moves
    cuBLAS's first-call work to the first requests. HYBRID_ENGINE_WARM_PROJECTIONS=0 turns it off (A/B)."""
    from ..kernels._triton import env_flag
    from ..models.llama_jit import warm_projections

    if not env_flag("HYBRID_ENGINE_WARM_PROJECTIONS", "cuBLAS's first calls at every prefill row count at load",
                    "at the first request of each length"):
        return lambda: 0.0
    side, took = torch.cuda.Stream(device), [0.0]

    def run() -> None:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode(), torch.cuda.stream(side):
                warm_projections(model, max_rows)
            side.synchronize()
        except Exception as exc:  # noqa: BLE001 - see above
            logger.warning("warming the JIT path's projections failed (first requests pay cuBLAS's first calls): %s",
                           exc)
        took[0] = round(time.perf_counter() - t0, 3)

    thread = threading.Thread(target=run, name="hybrid-engine-warm-projections", daemon=True)
    thread.start()

    def join() -> float:
        thread.join()
        return took[0]
    return join


class _PhaseClock:
    """Wall time between marks; on CUDA a mark first waits for the device (wait=True; only before the capture worker
    starts), so that GPU work queued by a phase is counted in it."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.phases = device, {}
        self._last = time.perf_counter()

    def mark(self, name: str, wait: bool = True) -> None:
        if wait and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[name] = round(now - self._last, 3)
        self._last = now


def warm_up_material(cfg: EngineConfig, model: Any, rows: tuple[int, ...], max_model_len: int,
                     device: torch.device) -> str:
    """What decides the kernel variants a load's warm-up compiles, as text for `warm_cache_marker`: the package's
    sources and tuning tables, the Triton, torch and card, the kernels' environment switches, the model's shapes
    and dtype, and the engine settings the warm-up reads."""
    import triton

    from ..kernels import tuning

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    files = sorted(package.rglob("*.py")) + sorted(package.rglob("tuning/*.json"))
    user = tuning.user_dir() / f"{tuning.device_slug(torch.cuda.get_device_name(device))}.json"
    for path in files + ([user] if user.is_file() else []):
        digest.update(str(path.relative_to(package) if path.is_relative_to(package) else path).encode())
        digest.update(path.read_bytes())
    switches = sorted((k, v) for k, v in os.environ.items()
                      if k.startswith(("HYBRID_ENGINE_", "TRITON_")) and k != "HYBRID_ENGINE_COMPILE_WORKERS")
    settings = (cfg.max_num_seqs, cfg.block_size, cfg.prefill_buckets, cfg.prefill_chunk_size,
                cfg.enable_prefix_caching, cfg.batch_invariant, cfg.attention_backend, cfg.decode_buckets, cfg.capture)
    return repr((digest.hexdigest(), triton.__version__, torch.__version__, torch.cuda.get_device_name(device),
                 torch.cuda.get_device_capability(device), switches, model.args, str(model.embed_tokens.weight.dtype),
                 rows, max_model_len, settings))


def _touch(marker: Path) -> None:
    """Create `marker` (best effort: a read-only cache only loses the shortcut)."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError as exc:
        logger.debug("warm-up marker %s not written: %s", marker, exc)


def _check_kv_fits(num_blocks: int, per_seq: int, max_model_len: int, block_size: int) -> None:
    if num_blocks < per_seq:
        raise ValueError(f"num_kv_blocks={num_blocks} cannot hold one request of max_model_len={max_model_len} "
                         f"tokens: that needs {per_seq} blocks of {block_size} tokens; raise num_kv_blocks or lower "
                         "max_model_len")


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """The device of tensor-parallel rank `rank` (cuda:rank on a GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is available; use device='cpu' or 'auto'")
    if name == "cuda" and rank:
        return torch.device("cuda", rank)
    return torch.device(name)


def _resolve_dtype(name: str) -> torch.dtype | None:
    return None if name == "auto" else getattr(torch, name)


def _prefill_weight_copies(mode: str, model: Any, device: torch.device) -> int:
    """Apply EngineConfig.prefill_weight_copy (before the KV cache is sized from the memory left): bytes added."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return 0
    need = model.prefill_weight_copy_bytes()
    if mode == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if need > PREFILL_COPY_MAX_FREE_FRACTION * free:
            logger.info("prefill weight copy skipped: %.1f GiB needed, %.1f GiB free (auto uses at most %d%%)",
                        need / 2**30, free / 2**30, PREFILL_COPY_MAX_FREE_FRACTION * 100)
            return 0
    added = model.add_prefill_weight_copies()
    logger.info("prefill weight copy (QKV, gate/up stored transposed): %.2f GiB", added / 2**30)
    return added
