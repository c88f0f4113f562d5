"""LLM: the user-facing engine. Validates and tokenizes requests, hands them to the step loop (core.py), and
turns each sequence's deltas into streams and outputs. Requests from any number of threads are batched."""
from __future__ import annotations

import logging
import random
import weakref
from array import array
from typing import Any, AsyncIterator, Iterator, Sequence as Seq

from ..runtime import _gc
from ..config import EngineConfig
from ..detokenize import IncrementalDetokenizer, StopStringMatcher
from ..outputs import CompletionOutput, RequestOutput, StreamDelta
from ..runtime.rank import build_rank, resolve_device
from ..sampling_params import SamplingParams
from ..structured.compiler import CompiledGrammar, compiler_for
from ..structured.params import GuidedDecodingParams
from ..runtime.streams import stream_scope
from ..runtime.token_reader import TokenReader
from .async_stream import AsyncDriver, AsyncRequestStream
from .block_manager import BlockManager
from .chat import attach_tool_calls, check_messages, prepare_chat
from .core import EngineCore
from .prompt_memo import PromptMemo
from .scheduler import Scheduler
from .sequence import Sequence

logger = logging.getLogger(__name__)

Prompt = str | dict


class RequestStream:
    """Iterator over one request's StreamDeltas. Closing it (or dropping it) before the end cancels the request and
    frees its KV blocks at once; the other requests keep running."""

    def __init__(self, core: EngineCore, seq: Sequence) -> None:
        self._core, self.seq, self._done = core, seq, False

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> StreamDelta:
        if self._done:
            raise StopIteration
        try:
            delta = self._core.next_delta(self.seq)
        except BaseException:
            self._done = True
            raise
        if delta is None:  # cancelled (closed from another thread)
            self._done = True
            raise StopIteration
        if delta.finish_reason is not None:
            self._done = True
        return delta

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._core.cancel(self.seq)

    def __del__(self) -> None:
        if not self._done:  # never blocks: a finalizer may run on the thread that is driving the loop
            self._done = True
            self._core.cancel(self.seq, wait=False)


class LLM:
    """A model loaded for low-latency generation; concurrent requests are batched. Keywords are `EngineConfig`
    fields.

    >>> llm = LLM("tiny-llama")
    >>> out = llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0))[0]
    """

    def __init__(self, model: Any = "tiny-llama", **kwargs: Any) -> None:
        self.config = cfg = EngineConfig.from_kwargs(model, **kwargs)
        self.device = resolve_device(cfg.device)
        self.executor = None
        comm = None
        if cfg.tensor_parallel_size > 1:  # ranks 1.. in worker processes, rank 0 here (vLLM's driver worker)
            from ..distributed.executor import TensorParallelExecutor

            self.executor = TensorParallelExecutor(cfg, self.device)
            comm = self.executor.comm
        try:
            rank = build_rank(cfg, self.device, (0, cfg.tensor_parallel_size), comm)
            if self.executor is not None:
                self.executor.wait_ready()
        except BaseException:
            if self.executor is not None:
                self.executor.shutdown()
            raise
        loaded = rank.loaded
        self.model, self.model_config, self.tokenizer = loaded.model, loaded.hf_config, loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        self.dtype = self.model.embed_tokens.weight.dtype
        self.ops, self.kv, self.graphs, self.stream_ctx = rank.ops, rank.kv, rank.graphs, rank.stream
        self.prefill_weight_copy_bytes = rank.prefill_weight_copy_bytes
        self.load_phases_s = rank.load_s  # where this process's load went (runtime/rank.build_rank)
        self._rank_runner = rank.runner  # this process's own (rank 0's) runner
        self.runner = rank.runner if self.executor is None else self.executor.runner(rank.runner)
        self.reader = TokenReader(rank.runner.buf.tokens, self.device, depth=cfg.max_num_seqs + 4,
                                  stream=self.stream_ctx)
        self._tp_shutdown = None
        if self.executor is not None:
            self.reader.watch = rank.runner.staging.watch = self.executor.check
            # holds no reference to the LLM: runs when it is collected or at exit, unless close() ran it
            self._tp_shutdown = weakref.finalize(self, _shutdown_tensor_parallel, self.executor, self.stream_ctx,
                                                 self.graphs)
        self.eos_token_ids = _eos_ids(self.model_config, self.tokenizer)
        salt = (loaded.source, str(self.dtype))  # what else changes a block's KV for the same tokens
        self.scheduler = Scheduler(BlockManager(rank.num_blocks, cfg.block_size, cfg.enable_prefix_caching, salt),
                                   cfg.max_num_seqs)
        self._rng = random.Random(cfg.seed)
        self._memo = PromptMemo()  # the last long prompts: a conversation's next turn checks and hashes its tail only
        self.core = EngineCore(self.runner, self.scheduler, self.reader, stream_scope(self.stream_ctx),
                               self.eos_token_ids, self.graphs, lookahead=self.device.type == "cuda",
                               chunk_size=cfg.prefill_chunk_size, batched_prefill=cfg.batched_prefill)
        self.driver = AsyncDriver(self.core)  # drives async requests; its thread starts with the first of them
        logger.info("LLM ready: %s on %s (%s), max_model_len=%d, max_num_seqs=%d, %d KV blocks, attention=%s%s",
                    loaded.source, self.device, self.dtype, self.max_model_len, cfg.max_num_seqs, rank.num_blocks,
                    self.ops.name, f", tensor_parallel_size={cfg.tensor_parallel_size}" if self.executor else "")

    # ---------------- public API ----------------
    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[
            SamplingParams] | None = None, *, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for one prompt or a list (run together, batched); one RequestOutput per prompt, in order."""
        streams = [self._submit(seq) for seq in self.sequences(prompts, sampling_params)]
        try:
            it = streams
            if use_tqdm:
                from tqdm import tqdm

                it = tqdm(streams, desc="generate")
            return [self._collect(s) for s in it]
        finally:
            for s in streams:
                s.close()

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas as tokens are generated. Closing the iterator early cancels the request."""
        deltas = self.stream_deltas(prompt, sampling_params)
        try:
            for d in deltas:
                if d.text:
                    yield d.text
        finally:
            deltas.close()

    def stream_deltas(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> RequestStream:
        """StreamDelta per generated token; the last carries finish_reason and metrics. Validates and submits at
        once (so several streams opened together are batched); closing the stream cancels the request."""
        return self._submit(self.sequences([prompt], sampling_params)[0])

    def sequences(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[
            SamplingParams] | None = None) -> list[Sequence]:
        """Validate and tokenize requests into unsubmitted Sequences (all are checked before any is returned)."""
        plist = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if not plist:
            raise ValueError("prompts is empty; pass a string, a {'prompt_token_ids': [...]} dict or a list of them")
        params = sampling_params or SamplingParams()
        plist_params = list(params) if isinstance(params, (list, tuple)) else [params] * len(plist)
        if len(plist_params) != len(plist):
            raise ValueError(f"got {len(plist_params)} SamplingParams for {len(plist)} prompts")
        requests = [(*self._prompt_ids(p), sp) for p, sp in zip(plist, plist_params)]
        for _, ids, _, sp in requests:
            self._check_lengths(ids, sp)
        grammars = [self._compile(sp.structured_output) for *_, sp in requests]
        return [self._sequence(text, ids, sp, g, memo) for (text, ids, memo, sp), g in zip(requests, grammars)]

    # ---------------- async API (engine/async_stream.py; one background thread drives the steps) ----------------
    async def agenerate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[
            SamplingParams] | None = None) -> list[RequestOutput]:
        """`generate` for asyncio callers: awaits the outputs without blocking the event loop; batched."""
        streams = [AsyncRequestStream(self.driver, seq) for seq in self.sequences(prompts, sampling_params)]
        try:
            return [request_output(s.seq, [d async for d in s]) for s in streams]
        finally:
            for s in streams:
                s.cancel()

    async def astream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> AsyncIterator[str]:
        """`stream` for asyncio callers (`async for text in llm.astream(...)`); leaving early cancels."""
        deltas = self.astream_deltas(prompt, sampling_params)
        try:
            async for delta in deltas:
                if delta.text:
                    yield delta.text
        finally:
            deltas.cancel()

    def astream_deltas(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> AsyncRequestStream:
        """`stream_deltas` for asyncio callers; validates and submits at once. Closing it (`aclose()`), dropping it
        or cancelling the task that awaits it cancels the request."""
        return AsyncRequestStream(self.driver, self.sequences([prompt], sampling_params)[0])

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, tool_choice: str | dict = "auto", parallel_tool_calls: bool = True,
             *, chat_template: str | None = None) -> RequestOutput:
        """Generate the assistant's reply to `messages` (the tokenizer's chat template, or `chat_template`).

        tools: OpenAI function tools; they reach the model through the chat template where it renders them, else
        through a default Hermes-style system prompt (tools/prompt.py). tool_choice: "auto", "none", "required" or
        {"type": "function", "function": {"name": ...}}; "required" and a named function are enforced by a grammar,
        so the call's arguments always validate against the tool's schema (parallel_tool_calls: more than one
        call allowed). With tools, `outputs[0].tool_calls` holds the parsed calls (OpenAI shape) and
        `outputs[0].text` the raw reply. A malformed tool or an unknown tool name raises ValueError naming it."""
        req = prepare_chat(self._need_tokenizer("chat messages"), messages, sampling_params, tools, tool_choice,
                           parallel_tool_calls, chat_template)
        out = self.generate({"prompt_token_ids": req.prompt_ids}, req.params)[0]
        return attach_tool_calls(out, req.plan)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        check_messages(messages)
        tok = self._need_tokenizer("chat messages")
        if not getattr(tok, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; pass plain prompts instead")
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def stats(self) -> dict[str, Any]:
        """Engine counters and configuration, e.g. for /metrics and /health."""
        sched = self.scheduler
        running, waiting = len(sched.running), len(sched.waiting) + len(self.core._inbox)
        s: dict[str, Any] = {
            "kv_blocks_total": sched.blocks.allocator.num_blocks,
            "kv_blocks_free": sched.blocks.num_free,
            "kv_blocks_cached": sched.blocks.num_cached,
            "enable_prefix_caching": sched.blocks.enable_caching,
            "prefix_cache_hit_tokens": sched.blocks.hit_tokens,
            "prefix_cache_queried_tokens": sched.blocks.queried_tokens,
            "prefix_cache_hit_rate": sched.blocks.hit_rate,
            "prefix_cache_evictions": sched.blocks.allocator.num_evicted,
            "kv_cache_bytes": self.kv.nbytes,
            "block_size": self.kv.block_size,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.config.max_num_seqs,
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "capture": self.config.capture if self.graphs is not None else "off",
            "prefill_weight_copy_bytes": self.prefill_weight_copy_bytes,
            "request_in_flight": running + waiting > 0,
            "requests_running": running,
            "requests_waiting": waiting,
            "preemptions": sched.num_preemptions,
            "prefill_chunks": self.core.chunks,
            "decode_batch_sizes": {rows: n for rows, n in enumerate(list(sched.batch_sizes)) if n},
            **self.core.counts,
            **self.ops.describe(),
        }
        s.update(self.graphs.stats() if self.graphs is not None else
                 {"graphs_captured": 0, "graphs_pending": 0, "graphs_failed": 0, "graph_pool_bytes": 0})
        return s

    def reset_prefix_cache(self) -> int:
        """Drop the KV blocks kept for prefix reuse that no request holds (as vLLM's `reset_prefix_cache`), e.g.
        between benchmark runs; running requests keep theirs. Returns the number of blocks freed."""
        return self.core.reset_prefix_cache()

    def close(self) -> None:
        """Stop the capture worker (and tensor-parallel workers) and drop GPU memory held by the engine."""
        self.driver.close()
        if self.graphs is not None:
            self.graphs.stop()
            self.graphs = self._rank_runner.graphs = None
        if self._tp_shutdown is not None:
            self._tp_shutdown()  # once; also at garbage collection or interpreter exit if close() is never called
        _gc.unfreeze()  # the engine's objects (it has reference cycles) can be collected again

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------- internals ----------------
    def _sequence(self, text: str | None, ids: list[int], params: SamplingParams, grammar: Any,
                  memo: tuple[Any, list[int], list[Any], int]) -> Sequence:
        """memo (from `_prompt_ids`): (the caller's ids, the block hashes and verified cache entries of a remembered
        prompt this one extends, that prompt's length; [], [] and 0 if none): the new sequence starts with the
        hashes and entries of the blocks inside the shared part, and the memo keeps it in turn (if it is long
        enough)."""
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        seq = Sequence(ids, params, seed, text, IncrementalDetokenizer(self.tokenizer, ids),
                       StopStringMatcher(params.stop), grammar=grammar)
        caller_ids, hashes, entries, shared = memo
        n = shared // self.kv.block_size
        seq.block_hashes, seq.block_entries = hashes[:n], entries[:n]
        self._memo.remember(caller_ids, ids, seq.block_hashes, seq.block_entries)
        return seq

    def _compile(self, constraint: GuidedDecodingParams | None) -> CompiledGrammar | None:
        """The compiled grammar of a request's structured_output (cached per constraint); ValueError naming the
        problem when it does not compile."""
        if constraint is None:
            return None
        tok = self._need_tokenizer("structured_output")
        return compiler_for(tok, self.model.args.vocab_size).compile(constraint)

    def _submit(self, seq: Sequence) -> RequestStream:
        if self.executor is not None:
            self.executor.check()  # a dead worker ends the engine: no request is accepted after it
        self.core.add(seq)
        return RequestStream(self.core, seq)

    def _collect(self, stream: RequestStream) -> RequestOutput:
        return request_output(stream.seq, list(stream))

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int], tuple[Any, list[int], list[Any], int]]:
        """(text, checked ids, memo): memo for `_sequence`."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids, text = prompt["prompt_token_ids"], prompt.get("prompt")
                if not isinstance(ids, (list, tuple)):
                    raise ValueError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
            elif "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
            else:
                raise ValueError(f"prompt dict needs 'prompt_token_ids' or 'prompt'; got keys {sorted(prompt)}")
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty ('')")
            text, ids = prompt, self._need_tokenizer("text prompts")(prompt)["input_ids"]
        else:
            raise ValueError(f"prompt must be str or dict, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty (0 tokens)")
        found = self._memo.find(ids)
        if found is None:
            checked, hashes, entries, shared = self._checked_ids(ids), [], [], 0
        else:  # the next turn of a remembered prompt: only its new tail is checked
            prev, hashes, entries = found
            shared = len(prev)
            checked = prev + self._checked_ids(ids[shared:]) if shared < len(ids) else list(prev)
        return text, checked, (ids, hashes, entries, shared)

    def _checked_ids(self, ids: list[int] | tuple[int, ...]) -> list[int]:
        """`ids` as a list of Python ints, each in [0, vocab); ValueError naming the offenders otherwise. Packed into
        an int64 array in one C pass (a long agent history is checked on its request's critical path)."""
        vocab = self.model.args.vocab_size
        try:
            packed = array("q", ids)  # ints (bools and numpy ints too); floats, strings, None raise
        except (TypeError, OverflowError):
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            raise ValueError(f"prompt_token_ids must be ints in [0, {vocab}); got {bad[:5]!r}") from None
        out = packed.tolist()
        low, high = min(out), max(out)  # numpy's min / max cost more here, short lists most (a call's overhead)
        if low < 0 or high >= vocab:
            bad = [t for t in out if not 0 <= t < vocab][:5]
            raise ValueError(f"prompt token ids {bad} are outside the vocabulary [0, {vocab})")
        return out

    def _check_lengths(self, ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                             f"{len(ids) + params.max_tokens} exceeds max_model_len={self.max_model_len}")

    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"{what} need a tokenizer; pass tokenizer=... or use {{'prompt_token_ids': [...]}}")
        return self.tokenizer


def request_output(seq: Sequence, deltas: list[StreamDelta]) -> RequestOutput:
    """The RequestOutput of a finished sequence from all of its deltas."""
    last = deltas[-1]
    comp = CompletionOutput(0, "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
                            last.finish_reason, last.stop_reason)
    return RequestOutput(seq.request_id, seq.prompt_text, seq.prompt_ids, [comp], last.metrics,
                         num_cached_tokens=seq.num_cached_tokens)


def _shutdown_tensor_parallel(executor: Any, stream: Any, graphs: Any) -> None:
    """Stop the capture worker, then leave the group (NCCL's abort waits for the graphs holding its collectives:
    the executor destroys them while it waits) and end the workers."""
    if graphs is not None:
        graphs.stop()
    executor.shutdown(stream, graphs.release if graphs is not None else None)


def _eos_ids(hf_config: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    eos = getattr(hf_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
