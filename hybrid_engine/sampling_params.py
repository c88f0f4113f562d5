"""Per-request sampling options (vLLM-shaped)."""
from __future__ import annotations

from dataclasses import dataclass

from .structured.params import GuidedDecodingParams


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. top_k 0 or -1 disables top-k; top_p 1.0 disables nucleus sampling.
    seed makes a sampled request reproducible. stop strings are cut from the output text.
    structured_output constrains the output to a JSON schema, any JSON object, a regex, one of several strings or
    a Lark grammar (`hybrid_engine.structured.GuidedDecodingParams`; needs the `structured` extra): each step
    samples only tokens the grammar allows, EOS only where the grammar may end, and the request finishes
    ("stop") once the grammar is complete.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    structured_output: GuidedDecodingParams | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature!r} must be a number in [0, 100] (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= -1 (0 or -1 disables top-k)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be a number in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed!r} must be None or an int in [0, 2**63)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must be non-empty strings")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be non-negative ints")
        if self.structured_output is not None and not isinstance(self.structured_output, GuidedDecodingParams):
            raise ValueError(f"structured_output={self.structured_output!r:.200} must be None or a "
                             "GuidedDecodingParams (json_schema=, json_object=, regex=, choice= or grammar=)")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
