"""Request-size limits, checked before any expensive work.

A body over `max_request_bytes` is answered 413 from its Content-Length, or as soon as the bytes read exceed the
limit for a body sent without one: it is never held in full, parsed or tokenized. A prompt longer than
`max_prompt_chars` characters is answered 400 before it is tokenized (tokenizing megabytes takes seconds of CPU
and leaves hundreds of MB in the allocator).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from hybrid_engine.server.protocol import APIError

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# A normalizer can fold two characters into one (NFKC), so a token may cover up to twice its vocabulary string.
_CHARS_PER_VOCAB_CHAR = 2


def too_large(limit: int, seen: str) -> APIError:
    return APIError(413, f"request body of {seen} exceeds the limit of {limit} bytes (--max-request-bytes)",
                    code="request_too_large")


@dataclass(slots=True)
class RequestLimits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_prompt_chars: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.max_request_bytes, int) and self.max_request_bytes >= 1):
            raise ValueError(f"max_request_bytes={self.max_request_bytes!r} must be an int >= 1")
        if self.max_prompt_chars is not None and not (
                isinstance(self.max_prompt_chars, int) and self.max_prompt_chars >= 1):
            raise ValueError(f"max_prompt_chars={self.max_prompt_chars!r} must be None or an int >= 1")

    async def read_body(self, request: Request) -> bytes:
        """The body, or APIError(413) before more than max_request_bytes of it are held."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(limit, f"{int(declared)} bytes (Content-Length)")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                chunks.clear()  # the exception's traceback keeps this frame alive until the 413 is sent
                raise too_large(limit, f"more than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """APIError(400) for a prompt too long to fit max_model_len whatever its tokens are."""
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise APIError(400, f"{param} has {chars} characters, more than max_prompt_chars={self.max_prompt_chars}"
                                f" (no prompt that long fits max_model_len); shorten it",
                           param=param, code="context_length_exceeded")


def derived_max_prompt_chars(llm: Any) -> int | None:
    """max_model_len x the longest vocabulary entry (x2 for normalization): no longer prompt can fit."""
    tokenizer = getattr(llm, "tokenizer", None)
    max_len = getattr(llm, "max_model_len", None) or getattr(getattr(llm, "config", None), "max_model_len", None)
    if tokenizer is None or not max_len or not hasattr(tokenizer, "get_vocab"):
        return None
    longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    if longest < 1:
        return None
    return int(max_len) * longest * _CHARS_PER_VOCAB_CHAR


def prompt_chars(prompt: str | dict[str, list[int]]) -> int:
    return len(prompt) if isinstance(prompt, str) else 0
