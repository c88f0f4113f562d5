"""The last few long prompts, for the next turn of a conversation: an agent or a chat front end re-sends its whole
history every turn, and only the tail is new.

A new prompt that starts with a remembered one takes that prompt's checked token ids instead of checking them again
(one pass over the shared part, which compares pointers where the caller reuses its list's int objects, as
`history + answer + message` does), and the prefix-cache hashes of its full blocks from that request's sequence
instead of hashing them again, with the cache index entries that request verified for them (claims: the block
manager checks that each is still the one in the index, by identity, instead of comparing its tokens again). On
the H200 a turn after ~2,000 tokens of history spent 0.4-0.9 ms of host time before its prefill, growing with
the history (benchmarks/NOTES.md, 2026-12-01): checking and hashing were most of it.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any

MEMO_PROMPTS = 8  # conversations going on at once whose last prompt is remembered
MEMO_MIN_TOKENS = 256  # shorter prompts are checked and hashed from scratch (cheap), and not remembered


class PromptMemo:
    """(caller's ids, checked ids, block hashes, verified index entries) of the last `size` prompts of at least
    `min_tokens` tokens."""

    def __init__(self, size: int = MEMO_PROMPTS, min_tokens: int = MEMO_MIN_TOKENS) -> None:
        self.min_tokens = min_tokens
        self._entries: deque[tuple[list, list[int], list[int], list[Any]]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.hits = 0

    def find(self, ids: object) -> tuple[list[int], list[int], list[Any]] | None:
        """(checked ids, block hashes, entries) of the longest remembered prompt `ids` (a list) starts with, or
        None. The checked ids are equal to `ids[:len(them)]` and are Python ints; the hashes and entries lists are
        the remembered sequence's own (they may have changed since: only the blocks inside the shared part are the
        caller's to use, and the entries only as claims to check)."""
        if type(ids) is not list or len(ids) < self.min_tokens:
            return None
        with self._lock:
            entries = sorted(self._entries, key=lambda e: len(e[0]), reverse=True)  # the longest match wins
        n_ids = len(ids)
        # (a conversation's earlier turns are prefixes too: one compare)
        for caller, checked, hashes, verified in entries:
            n = len(caller)
            if n > n_ids:
                continue
            try:
                same = ids[n - 1] == caller[n - 1] and ids[:n] == caller
            except Exception:  # noqa: BLE001 - an element that does not compare (e.g. an array): no match
                same = False
            if same:
                self.hits += 1
                return checked, hashes, verified
        return None

    def remember(self, caller_ids: object, checked: list[int], hashes: list[int], verified: list[Any]) -> None:
        """Keep a prompt as the caller gave it (a copy of the list: the caller may change theirs) with its checked
        ids and its sequence's block-hash and verified-entry lists."""
        if type(caller_ids) is list and len(checked) >= self.min_tokens:
            with self._lock:
                self._entries.append((list(caller_ids), checked, hashes, verified))
