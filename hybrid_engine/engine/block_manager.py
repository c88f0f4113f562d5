"""KV-cache block bookkeeping: reference-counted blocks, growth as sequences grow, and the prefix cache.

Prefix caching (vLLM's automatic prefix caching): a full block whose KV is written is registered under a hash chained
over (the previous block's hash, its token ids), rooted in an engine salt (model and dtype), so that a block's hash
names its whole prefix. A new sequence takes the longest run of registered blocks of its prompt (incrementing their
reference counts) and prefills only the rest. A block whose count drops to 0 keeps its KV and hash (it is "cached")
until the allocator needs room, then the least recently freed one is evicted. A block with a nonzero count is never
handed out.
"""
from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Iterator

from ..errors import HybridEngineError


def _blocks(ids: list[int], lo: int, hi: int, block_size: int) -> Iterator[tuple[int, ...]]:
    """The token tuples of the consecutive blocks of ids[lo:hi] (hi - lo a multiple of block_size), one C-level
    pass (a 2,000-token prompt's blocks are hashed on its critical path)."""
    return zip(*[iter(ids[lo:hi])] * block_size)


@dataclass(slots=True, eq=False)
class _Entry:
    """A registered block: the hash chain link and the tokens, compared on lookup (a hash alone could collide).
    Compared by identity (`None in entries` stays a C-level pass)."""

    block: int
    parent: int
    tokens: tuple[int, ...]

    def holds(self, parent: int, tokens: tuple[int, ...]) -> bool:
        return self.parent == parent and self.tokens == tokens


class BlockAllocator:
    """Hands out block ids. Every id is in exactly one state: free (holds nothing), cached (refcount 0, registered
    content, evictable, in LRU order) or referenced (refcount >= 1)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, int] = {}  # block -> its hash, for registered blocks
        self.by_hash: dict[int, _Entry] = {}
        self.num_evicted = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_available(self) -> int:
        """Blocks `allocate` can hand out: the free ones and the cached ones (evicted on demand)."""
        return len(self._free) + len(self._cached)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_available:
            raise HybridEngineError(f"KV cache full: {n} blocks wanted, {self.num_available} free or cached of "
                                    f"{self.num_blocks}")
        blocks = [self._take() for _ in range(n)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._cached.popitem(last=False)  # least recently freed
        self._unregister(block)
        self.num_evicted += 1
        return block

    def acquire(self, blocks: list[int]) -> None:
        """One more reference to each registered block (cache hits); a cached one leaves the evictable set."""
        refs, cached = self.refs, self._cached
        for block in blocks:
            if refs[block] == 0:
                del cached[block]
            refs[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block, last block first: a sequence's tail blocks are then evicted before its
        head, which later prompts sharing the head can still hit."""
        bad = [b for b, n in Counter(blocks).items() if not 0 <= b < self.num_blocks or self.refs[b] < n]
        if bad:
            raise HybridEngineError(f"blocks {sorted(set(bad))[:5]} freed twice or never allocated")
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def register(self, block: int, h: int, parent: int, tokens: tuple[int, ...]) -> None:
        """Name a referenced, full, written block by its hash (no-op if it already has one or another block holds
        that content: the first stays the one later prompts hit)."""
        if block in self.hash_of or h in self.by_hash:
            return
        self.hash_of[block] = h
        self.by_hash[h] = _Entry(block, parent, tokens)

    def _unregister(self, block: int) -> None:
        h = self.hash_of.pop(block, None)
        if h is not None:
            del self.by_hash[h]

    def drop_cached(self) -> None:
        """Forget every cached block (their KV is no longer trusted, e.g. after a failed step)."""
        while self._cached:
            block, _ = self._cached.popitem(last=False)
            self._unregister(block)
            self._free.append(block)

    def check(self) -> None:
        """Raise if the bookkeeping is inconsistent (tests)."""
        free, cached = set(self._free), set(self._cached)
        referenced = {b for b in range(self.num_blocks) if self.refs[b] > 0}
        if free & cached or free & referenced or cached & referenced or len(free) != len(self._free):
            raise HybridEngineError("a block is in two states")
        if len(free) + len(cached) + len(referenced) != self.num_blocks:
            raise HybridEngineError("a block is in no state")
        if free & set(self.hash_of) or not cached <= set(self.hash_of):
            raise HybridEngineError("free blocks must be unregistered and cached blocks registered")
        if {e.block for e in self.by_hash.values()} != set(self.hash_of):
            raise HybridEngineError("the hash index and the block index disagree")


class BlockManager:
    """Grows each sequence's block table as its KV grows (blocks are never reserved up front) and finds and registers
    cached prefixes (`enable_caching`)."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, salt: object = None) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.root = hash(("hybrid-engine-kv", salt))  # the parent hash of every first block
        self.hit_tokens = 0  # prompt tokens served from the cache, over all admissions
        self.queried_tokens = 0  # prompt tokens looked up, over all admissions

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def num_cached(self) -> int:
        return self.allocator.num_cached

    @property
    def num_available(self) -> int:
        return self.allocator.num_available

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def missing(self, table: list[int], num_tokens: int) -> int:
        """Blocks `table` lacks to hold `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        """Append blocks to `table` (in place) until it holds `num_tokens` positions; returns the new ids."""
        new = self.allocator.allocate(self.missing(table, num_tokens))
        table.extend(new)
        return new

    def release(self, table: list[int]) -> None:
        """Drop the table's references (registered blocks stay cached) and empty it."""
        if table:
            self.allocator.free(table)
            table.clear()

    # ---- prefix cache ----
    def hashes(self, ids: list[int], known: list[int], num_blocks: int) -> list[int]:
        """`known` extended in place to (at least) the chained hashes of the first `num_blocks` full blocks of `ids`;
        it holds those computed before (a sequence's list: its token ids only ever grow)."""
        bs, j = self.block_size, len(known)
        if j < num_blocks:
            parent = known[-1] if j else self.root
            for block in _blocks(ids, j * bs, num_blocks * bs, bs):
                parent = hash((parent, block))
                known.append(parent)
        return known

    def cached_prefix(self, ids: list[int], known: list[int], entries: list[_Entry] | None = None) -> list[int]:
        """The registered blocks of the longest cached run of full blocks of `ids`, leaving at least the last token
        to compute (its logits give the first output token). Takes no reference; hashes only up to the first miss.

        `known` holds the chained hashes of the first blocks (extended in place). `entries`, if given, holds on
        entry the index entries a conversation's previous turn verified for its first blocks (engine/prompt_memo.py:
        the caller's ids start with that turn's) and is left holding the hit's entries. On a request's critical
        path (before its prefill starts), so in C-level passes where it can: a claimed entry still in the index is
        the one verified (entries are compared by identity and never change), a known hash's entry is checked by
        comparing parents and tokens list to list, and only the rest one block at a time."""
        out: list[_Entry] = [] if entries is None else entries
        if not self.enable_caching:
            out.clear()
            return []
        bs, by_hash = self.block_size, self.allocator.by_hash
        full = (len(ids) - 1) // bs
        del out[min(len(out), len(known), full):]
        if out:
            now = list(map(by_hash.get, known[:len(out)]))
            if now != out:  # a claimed block was evicted (or its hash taken by other content): the run ends before it
                del out[next(j for j, (a, b) in enumerate(zip(now, out)) if a is not b):]
        j = len(out)
        if j < len(known) and j < full:
            out += self._checked_entries(ids, known[:full], j)
            if len(out) < min(len(known), full):  # a miss among the known blocks ends the run
                return [e.block for e in out]
            j = len(out)
        parent = known[j - 1] if j else self.root  # past the known hashes here (j == len(known)) or done
        for block in _blocks(ids, j * bs, full * bs, bs):
            h = hash((parent, block))
            known.append(h)
            e = by_hash.get(h)
            if e is None or not e.holds(parent, block):
                break
            out.append(e)
            parent = h
        return [e.block for e in out]

    def _checked_entries(self, ids: list[int], hashes: list[int], start: int) -> list[_Entry]:
        """The index entries of the longest run of blocks start.. of `ids` whose chained hashes are `hashes[start:]`,
        each entry's parent and tokens compared (a hash alone could collide): one dict pass and two list compares
        where a block-by-block check costs ~0.6 us a block (125 blocks for a 2,000-token history)."""
        entries = list(map(self.allocator.by_hash.get, hashes[start:]))
        if None in entries:
            del entries[entries.index(None):]
        bs, end = self.block_size, start + len(entries)
        parents = [hashes[start - 1] if start else self.root, *hashes[start:end - 1]]
        blocks = list(_blocks(ids, start * bs, end * bs, bs))
        if [e.parent for e in entries] == parents and [e.tokens for e in entries] == blocks:
            return entries
        for j, (e, parent, block) in enumerate(zip(entries, parents, blocks)):  # some entry differs: find it
            if not e.holds(parent, block):
                return entries[:j]
        return entries

    def cost(self, hit: list[int], num_tokens: int) -> int:
        """Available blocks an admission with cache hit `hit` takes to hold `num_tokens` positions: the new ones and
        the hit blocks that were cached (they leave the evictable set)."""
        return self.blocks_for(num_tokens) - len(hit) + list(map(self.allocator.refs.__getitem__, hit)).count(0)

    def admit(self, table: list[int], hit: list[int], num_tokens: int) -> None:
        """Fill an empty `table` for `num_tokens` positions: the hit blocks (referenced), then new ones."""
        self.allocator.acquire(hit)
        table.extend(hit)
        self.grow(table, num_tokens)
        self.queried_tokens += num_tokens
        self.hit_tokens += len(hit) * self.block_size

    def register(self, table: list[int], ids: list[int], known: list[int], start: int, end: int,
                 entries: list[_Entry] | None = None) -> int:
        """Register the table's full blocks start..end-1 (their KV written or enqueued; ids holds their tokens);
        returns `end`, the count registered so far. `entries` (the sequence's verified index entries, see
        `cached_prefix`) is extended while it is the run of blocks 0..j-1: with the entry made for each block, or
        the one already naming the same content."""
        if not self.enable_caching or end <= start:
            return max(start, end)
        hashes = self.hashes(ids, known, end)
        alloc = self.allocator
        for j, block in enumerate(_blocks(ids, start * self.block_size, end * self.block_size, self.block_size),
                                  start):
            parent = hashes[j - 1] if j else self.root
            alloc.register(table[j], hashes[j], parent, block)
            if entries is not None and len(entries) == j:
                e = alloc.by_hash[hashes[j]]
                if e.block == table[j] or e.holds(parent, block):
                    entries.append(e)
        return end

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
