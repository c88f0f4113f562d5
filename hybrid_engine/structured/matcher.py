"""The per-request grammar state: which tokens may come next, and the tokens the request has taken.

Masks are llguidance's packed format: int32 words, bit `t % 32` of word `t // 32` set when token t is allowed
(`bitmask.py` allocates, unpacks and applies them). llguidance computes a mask with the GIL released, so an engine
can fill the next step's masks in a thread while the GPU runs the current step.
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from .bitmask import bitmask_width
from .library import load_llguidance


class Matcher:
    """Grammar state of one request (made by `CompiledGrammar.matcher()`).

    Call `fill_bitmask` before sampling a step, `accept` with the sampled token after it. Once `is_terminated()`,
    only EOS may follow and the request should finish."""

    def __init__(self, ll_matcher: Any, vocab_size: int):
        self._m = ll_matcher
        self.vocab_size = vocab_size
        self.num_accepted = 0

    def fill_bitmask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into `bitmask_row`: a contiguous CPU int32 tensor of
        `bitmask_width(vocab_size)` words (a row of `allocate_token_bitmask(...)`)."""
        if bitmask_row.dim() != 1:
            raise ValueError(f"bitmask_row must be 1-D, got shape {tuple(bitmask_row.shape)}")
        _check_rows(bitmask_row.unsqueeze(0), self.vocab_size)
        self._m.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and the matcher stays in its error state) if the grammar forbids it."""
        ok = bool(self._m.consume_token(int(token_id)))
        if ok:
            self.num_accepted += 1
        return ok

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance by several tokens (e.g. re-feeding a preempted request's output); False at the first refusal."""
        return all(self.accept(t) for t in token_ids)

    def is_terminated(self) -> bool:
        """True when the grammar is complete: nothing but EOS may follow (also true in the error state)."""
        return bool(self._m.is_stopped())

    def is_accepting(self) -> bool:
        """True when the output so far is a complete match (more tokens may still be allowed)."""
        return bool(self._m.is_accepting())

    def error(self) -> str | None:
        """The reason the matcher refused a token, or None while it has not."""
        return self._m.get_error() or None

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative decoding, a stop string cut back)."""
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"rollback num_tokens must be in [0, {self.num_accepted}] (tokens accepted), "
                             f"got {num_tokens}")
        if num_tokens and not self._m.rollback(num_tokens):
            raise RuntimeError(f"llguidance could not roll back {num_tokens} tokens: {self._m.get_error()}")
        self.num_accepted -= num_tokens

    def reset(self) -> None:
        """Back to the start of the grammar."""
        self._m.reset()
        self.num_accepted = 0

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next whatever the logits (a jump-forward opportunity)."""
        return list(self._m.compute_ff_tokens())


_EXECUTOR: Any = None
_EXECUTOR_LOCK = threading.Lock()


def fill_bitmasks(matchers: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor) -> None:
    """Fill the rows of `bitmask` ([B, W] contiguous CPU int32) for (matcher, row) pairs in parallel, in
    llguidance's own threads with the GIL released; rows not named are left as they are."""
    if not matchers:
        return
    vocab_size = matchers[0][0].vocab_size
    _check_rows(bitmask, vocab_size)
    for matcher, row in matchers:
        if matcher.vocab_size != vocab_size or not 0 <= row < bitmask.shape[0]:
            raise ValueError(f"row {row} (vocab {matcher.vocab_size}) does not fit a bitmask of shape "
                             f"{tuple(bitmask.shape)} for vocab {vocab_size}")
    pairs = [(m._m, row) for m, row in matchers]
    _executor().unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


def _executor() -> Any:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = load_llguidance().LLExecutor()
        return _EXECUTOR


def _check_rows(bitmask: torch.Tensor, vocab_size: int) -> None:
    width = bitmask_width(vocab_size)
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError(f"bitmask must be a contiguous CPU int32 tensor, got {bitmask.dtype} on {bitmask.device}"
                         f"{'' if bitmask.is_contiguous() else ' (not contiguous)'}")
    if bitmask.dim() != 2 or bitmask.shape[1] != width:
        raise ValueError(f"bitmask must have shape [rows, {width}] for vocab {vocab_size}, got "
                         f"{tuple(bitmask.shape)}")
