"""Sequence: one request's whole state, from waiting to finished (vLLM's Request, nano-vllm's Sequence)."""
from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..detokenize import IncrementalDetokenizer, StopStringMatcher
from ..outputs import StreamDelta
from ..sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"    # queued, or preempted (its KV freed; it is recomputed when readmitted)
    RUNNING = "running"    # holds a batch row and KV blocks
    FINISHED = "finished"  # stopped, cancelled or failed; holds nothing


@dataclass(slots=True, eq=False)
class Sequence:
    """Token ids, sampling parameters, block table, batch row, detokenizer, stop state and output queue of one
    request. `num_enqueued` counts the output tokens whose steps the GPU has been given (the host reads them one
    step later); `epoch` changes on preemption, so tokens of steps enqueued before it are recognised and dropped."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    prompt_text: str | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopStringMatcher | None = None
    grammar: Any = None  # structured.CompiledGrammar of params.structured_output (None: unconstrained)
    matcher: Any = None  # structured.Matcher: the grammar's state after the output tokens read so far
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    row: int = -1
    num_enqueued: int = 0
    kv_len: int = 0  # positions the KV cache holds for it once every enqueued step has run
    prefill_len: int = 0  # tokens its current (re)admission prefills
    prefilled: int = 0  # of those, how many are enqueued (a long prompt goes in chunks)
    epoch: int = 0
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks (prefix cache)
    block_entries: list[Any] = field(default_factory=list)  # prefix-cache index entries verified for its first blocks
    num_registered: int = 0  # blocks of block_table registered in the prefix cache
    cache_hit: int = 0  # tokens of the current admission's prefill found in the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at its first admission
    cancelled: bool = False
    first_token_at: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: BaseException | None = None
    outbox: deque[StreamDelta] = field(default_factory=deque)
    consumer: Any = None  # async streams: called on the driving thread with each StreamDelta or the failure

    @property
    def request_id(self) -> str:
        return f"req-{self.seq_id}"

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def prefill_ids(self) -> list[int]:
        """What a (re)admission prefills: the prompt and every output token read so far (recompute preemption)."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def in_prefill(self) -> bool:
        """Admitted, but its prompt is not wholly enqueued yet: it takes no part in decode steps."""
        return self.prefilled < self.prefill_len

    @property
    def wants_tokens(self) -> bool:
        """Whether another decode step is needed: fewer output tokens enqueued than max_tokens."""
        return (self.status is Status.RUNNING and not self.cancelled and not self.in_prefill
                and self.num_enqueued < self.params.max_tokens)

