"""Incremental detokenization and stop-string matching for streamed output."""
from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Turns one token id at a time into text deltas (tokenizers' DecodeStream; full re-decode for slow tokenizers)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self._fast = getattr(tokenizer, "_tokenizer", None)
        self._stream = None
        self._ids: list[int] = []
        self._emitted = ""
        if self._fast is not None:
            from tokenizers.decoders import DecodeStream

            try:  # the prompt tail gives context (leading-space handling of sentencepiece vocabularies)
                self._stream = DecodeStream(ids=prompt_ids[-8:], skip_special_tokens=True)
            except TypeError:  # tokenizers < 0.22
                self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        if self._stream is not None:
            try:
                return self._stream.step(self._fast, token_id) or ""
            except Exception:  # an id outside the tokenizer's vocabulary: decodes to nothing
                return ""
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next token
            return ""
        delta, self._emitted = text[len(self._emitted):], text
        return delta


class StopStringMatcher:
    """Accumulates text; releases only what cannot be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = stop
        self.text = ""
        self._released = 0
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        """Add generated text; return the part that is now safe to emit (stop strings are never emitted)."""
        self.text += delta
        if not self.stop:
            return self._release(len(self.text))
        start = max(0, self._released - max(map(len, self.stop)) + 1)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            idx, self.matched = min(hits)
            self.text = self.text[:idx]
            return self._release(idx)
        return self._release(len(self.text) - self._partial_suffix())

    def flush(self) -> str:
        return self._release(len(self.text))

    def _partial_suffix(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        out, self._released = self.text[self._released:upto], upto
        return out
