"""Result types returned by LLM.generate / LLM.stream_deltas."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    """Latency of one request, in seconds. tpot_s is the mean time per output token after the first."""

    ttft_s: float = 0.0
    tpot_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS / stop string / stop token) or "length"
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if any
    # LLM.chat with tools: the calls parsed from `text` (which stays the raw output), OpenAI-shaped
    # {"id", "type": "function", "function": {"name", "arguments": <JSON string>}}; None when there are none
    tool_calls: list[dict] | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    finished: bool = True


@dataclass(slots=True)
class StreamDelta:
    """One step of a stream: new text and token ids; finish_reason and metrics are set on the last delta."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None
    stop_reason: str | int | None = None  # on the last delta: the stop string or stop token id that ended it
