"""On-device sampling: greedy, temperature, top-k, top-p with counter-based per-request randomness.

Randomness never touches torch's global generator (which breaks concurrent CUDA-graph capture). Each (seed, offset,
vocab index) is hashed to a uniform u in (0, 1) with a 32-bit integer hash (Wellons' lowbias32) that the torch
reference and the Triton kernel implement bit-identically; the token is the exponential-noise argmax
argmax_i p_i / E_i with E_i = -log(u_i), i.e. a sample from p. Filtering keeps token i when
  top-k: fewer than k tokens have a strictly larger logit (ties at the k-th value are all kept), and
  top-p: the renormalised (after top-k) mass of tokens strictly more likely than i is < top_p.
Both are thresholds on the scaled logit, so the kernel finds them by bisection without sorting.

A NaN logit counts as -inf, so that a row whose logits are all NaN (numerical overflow upstream) still gets a token
id inside the vocabulary (id 0 when nothing else is left) rather than an out-of-range one that would fail the next
step's embedding lookup for every row of the batch.

Grammar-constrained rows (structured output): an optional packed int32 bitmask [B, W] (token t allowed when bit
t % 32 of word t // 32 is set; columns past 32 * W disallowed) and a per-row flag; a flagged row's disallowed
logits become -inf before anything else, an unflagged row reads only its flag.
"""
from __future__ import annotations

import torch

from ._triton import jit_helpers, launch, next_pow2, pdl_enter
from ._workspace import split_buffers

tl = None  # triton.language, bound on first launch (see _triton.py)

MASK32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B
GOLDEN = 0x9E3779B9
SALT = 0x2545F491


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for 0 <= x < 2**32, split in 16-bit halves so that nothing overflows int64.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MUL2)
    return x ^ (x >> 16)


def row_keys_ref(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from the 64-bit seed and offset (int64 tensor holding values < 2**32)."""
    s, o = seeds.long(), offsets.long()
    h = _mix32(((o >> 32) & MASK32) ^ SALT)
    h = _mix32(h ^ (o & MASK32))
    h = _mix32(h ^ ((s >> 32) & MASK32))
    return _mix32(h ^ (s & MASK32))


def uniform_ref(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] fp32 uniforms in (0, 1)."""
    key = row_keys_ref(seeds, offsets)[:, None]
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :]
    return bits_to_uniform_ref(_mix32(key ^ _mul32(idx + 1, GOLDEN)))


def bits_to_uniform_ref(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> fp32 uniforms: 23 random bits + half an ulp, in [2**-24, 1 - 2**-24], never 0 or 1. (24 bits
    + half an ulp would round the top value to 1.0 in fp32: -log(u) = 0 and a score of +inf, or NaN on a masked
    logit, which argmax then picks.)"""
    return ((bits >> 9).float() + 0.5) * (1.0 / 8388608.0)


def allowed_ref(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Packed [B, W] int32 bitmask -> [B, vocab] bool (True = allowed); columns past 32 * W are False."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)[:, :vocab]
    if bits.shape[1] < vocab:
        bits = torch.cat([bits, bits.new_zeros(bits.shape[0], vocab - bits.shape[1])], dim=1)
    return bits


Advance = tuple[torch.Tensor, torch.Tensor]  # (tokens [B], positions [B]) int64 a decode step advances in place


def advance_ref(tok: torch.Tensor, offsets: torch.Tensor, advance: Advance | None) -> torch.Tensor:
    """What `advance` asks of a decode step's sample: each row's token into tokens, its sampling counter (offsets)
    and position one on. Returns the tokens (tok itself without `advance`)."""
    if advance is None:
        return tok
    tokens, positions = advance
    tokens.copy_(tok)
    offsets.add_(1)
    positions.add_(1)
    return tokens


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seeds: torch.Tensor, offsets: torch.Tensor, bitmask: torch.Tensor | None = None,
               masked: torch.Tensor | None = None, advance: Advance | None = None) -> torch.Tensor:
    """logits [B, V] fp32 -> tokens [B] int64. temperature 0 = argmax; top_k 0 and top_p 1.0 = off.
    bitmask [B, W] int32 and masked [B] (nonzero = apply that row's bitmask) constrain rows (see the module doc).
    advance=(tokens, positions): also advance the rows as a decode step does (`advance_ref`)."""
    return advance_ref(_sample_ref(logits, temperature, top_k, top_p, seeds, offsets, bitmask, masked), offsets,
                       advance)


def _sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                seeds: torch.Tensor, offsets: torch.Tensor, bitmask: torch.Tensor | None,
                masked: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    logits = logits.masked_fill(logits.isnan(), float("-inf"))  # a NaN logit is never drawn (see the module doc)
    if bitmask is not None:
        disallowed = ~allowed_ref(bitmask, logits.shape[1]) & (masked != 0)[:, None]
        logits = logits.masked_fill(disallowed, float("-inf"))
    batch, vocab = logits.shape
    greedy = temperature <= 0
    if logits.device.type == "cpu" and bool(greedy.all()):  # no draw needed (the hash is the CPU's time)
        return torch.argmax(logits, dim=-1)
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]
    if logits.device.type == "cpu" and not bool(((top_k > 0) & (top_k < vocab)).any() | (top_p < 1.0).any()):
        keep = torch.ones_like(scaled, dtype=torch.bool)  # no filter in any row: skip the sort (the CPU's time)
    else:
        keep = _filtered(scaled, top_k, top_p)
    noise = -torch.log(uniform_ref(seeds, offsets, vocab))
    score = torch.where(keep, scaled - torch.log(noise), torch.full_like(scaled, float("-inf")))
    sampled = torch.argmax(score, dim=-1)
    return torch.where(greedy, torch.argmax(logits, dim=-1), sampled)


def _filtered(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the tokens top-k and top-p keep (see the module doc)."""
    vocab = scaled.shape[1]
    ordered, _ = torch.sort(scaled, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.long().clamp(max=vocab), torch.full_like(top_k, vocab, dtype=torch.long))
    kth = ordered.gather(1, (k - 1)[:, None])
    keep_k = scaled >= kth
    # top-p over the renormalised top-k distribution; mass "strictly above" = exclusive cumsum at the first of ties
    probs_sorted = torch.softmax(ordered.masked_fill(ordered < kth, float("-inf")), dim=-1)
    above = torch.cumsum(probs_sorted, dim=-1) - probs_sorted
    in_nucleus = above < top_p.float()[:, None]
    in_nucleus[:, 0] = True
    p_threshold = ordered.masked_fill(~in_nucleus, float("inf")).amin(dim=-1, keepdim=True)
    return keep_k & ((top_p >= 1.0)[:, None] | (scaled >= p_threshold))


def _init_triton_globals(tl) -> None:
    """Module constants the kernels read, as tl.constexpr (Triton only reads constexpr globals)."""
    globals().update(MUL1_C=tl.constexpr(MUL1), MUL2_C=tl.constexpr(MUL2), GOLDEN_C=tl.constexpr(GOLDEN),
                     SALT_C=tl.constexpr(SALT), INT32_LO=tl.constexpr(-(2**31)), INT32_HI=tl.constexpr(2**31))


def _mix32_tl(x):
    x = x ^ (x >> 16)
    x = tl.mul(x, MUL1_C, sanitize_overflow=False)
    x = x ^ (x >> 15)
    x = tl.mul(x, MUL2_C, sanitize_overflow=False)
    return x ^ (x >> 16)


def _uniform_tl(seed, offset, idx):
    h = _mix32_tl(((offset >> 32) & 0xFFFFFFFF).to(tl.uint32) ^ SALT_C)
    h = _mix32_tl(h ^ (offset & 0xFFFFFFFF).to(tl.uint32))
    h = _mix32_tl(h ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    h = _mix32_tl(h ^ (seed & 0xFFFFFFFF).to(tl.uint32))
    bits = _mix32_tl(h ^ tl.mul((idx + 1).to(tl.uint32), GOLDEN_C, sanitize_overflow=False))
    return ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # as bits_to_uniform_ref


def _ordered_key(x):
    """float32 -> int32 key with the same order (-0.0 folded into +0.0 first)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _kth_largest_key(keys, valid, k):
    # invariant: count(keys >= lo) >= k > count(keys >= hi); the range halves exactly 32 times. Bounds are int64,
    # every compared value fits int32 (keys stay int32: half the registers of a whole row).
    lo = tl.full([], INT32_LO, tl.int64)
    hi = tl.full([], INT32_HI, tl.int64)
    for _ in range(32):
        mid = (lo + hi) >> 1
        enough = tl.sum((valid & (keys >= mid.to(tl.int32))).to(tl.int32), axis=0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    return lo


def _nucleus_key(keys, weights, limit):
    # smallest key t with mass(keys > t) < limit; invariant: mass(> lo) >= limit > mass(> hi)
    lo = tl.full([], INT32_LO - 1, tl.int64)
    hi = tl.full([], INT32_HI - 1, tl.int64)
    for _ in range(32):
        mid = (lo + hi) >> 1
        small = tl.sum(tl.where(keys >= (mid + 1).to(tl.int32), weights, 0.0), axis=0) < limit
        hi = tl.where(small, mid, hi)
        lo = tl.where(small, lo, mid)
    return hi.to(tl.int32)


def _row_logits(LOGITS, BITMASK, MASKED, row, stride_l, stride_m, words, idx, valid, HAS_MASK: tl.constexpr):
    """Logits idx of a row as fp32: NaN -> -inf (argmax would return a padding lane), a flagged row's disallowed
    tokens -inf."""
    logits = tl.load(LOGITS + row * stride_l + idx, mask=valid, other=float("-inf")).to(tl.float32)
    logits = tl.where(logits == logits, logits, float("-inf"))
    if HAS_MASK:
        if tl.load(MASKED + row) != 0:
            word = tl.load(BITMASK + row * stride_m + idx // 32, mask=valid & (idx // 32 < words), other=0)
            logits = tl.where(((word >> (idx % 32)) & 1) != 0, logits, float("-inf"))
    return logits


def _finish(OUT, OFFSETS, POSITIONS, row, token, offset, ADVANCE: tl.constexpr):
    """Store a row's token; ADVANCE: its sampling counter (read as `offset` by every draw) and position one on."""
    tl.store(OUT + row, token.to(tl.int64))
    if ADVANCE:
        tl.store(OFFSETS + row, offset + 1)
        tl.store(POSITIONS + row, tl.load(POSITIONS + row) + 1)


def _sample_kernel(LOGITS, TEMPERATURE, TOP_K, TOP_P, SEEDS, OFFSETS, OUT, BITMASK, MASKED, POSITIONS, PART, COUNT,
                   stride_l, stride_m, words, vocab, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
                   CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MASK: tl.constexpr,
                   ADVANCE: tl.constexpr = False, PDL: tl.constexpr = 0):
    """Grid (rows, CHUNKS). A row with top-k or top-p: its chunk-0 program holds the whole row in registers
    (BLOCK_V >= vocab) and draws from it. Any other row (greedy, or temperature alone) is an argmax of a per-token
    score: each program takes CHUNK tokens, stores its best (score, token), and the last to arrive picks the best
    of them (the first chunk on ties, as one argmax over the row would) and resets the row's counter (graph replays
    need no memset). ADVANCE: the row's sampling counter (OFFSETS) and position (POSITIONS) go one on once every
    draw has read the counter."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temperature = tl.load(TEMPERATURE + row)
    top_k = tl.load(TOP_K + row)
    top_p = tl.load(TOP_P + row)
    offset = tl.load(OFFSETS + row)
    filtered = (temperature > 0.0) & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0))
    if filtered:
        if chunk == 0:
            idx = tl.arange(0, BLOCK_V)
            valid = idx < vocab
            logits = _row_logits(LOGITS, BITMASK, MASKED, row, stride_l, stride_m, words, idx, valid, HAS_MASK)
            scaled = tl.where(valid, logits / temperature, float("-inf"))
            keys = _ordered_key(scaled)
            keep = valid
            if (top_k > 0) & (top_k < vocab):
                keep = keep & (keys >= _kth_largest_key(keys, valid, top_k).to(tl.int32))
            if top_p < 1.0:
                weights = tl.where(keep, tl.exp(scaled - tl.max(scaled, axis=0)), 0.0)
                threshold = _nucleus_key(keys, weights, top_p * tl.sum(weights, axis=0))
                keep = keep & (keys >= tl.minimum(threshold, tl.max(keys, axis=0)))
            u = _uniform_tl(tl.load(SEEDS + row), offset, idx)
            score = tl.where(keep, scaled - tl.log(-tl.log(u)), float("-inf"))
            _finish(OUT, OFFSETS, POSITIONS, row, tl.argmax(score, axis=0), offset, ADVANCE)
    else:
        idx = chunk * CHUNK + tl.arange(0, CHUNK)
        valid = idx < vocab
        score = _row_logits(LOGITS, BITMASK, MASKED, row, stride_l, stride_m, words, idx, valid, HAS_MASK)
        if temperature > 0.0:
            u = _uniform_tl(tl.load(SEEDS + row), offset, idx)
            score = tl.where(valid, score / temperature - tl.log(-tl.log(u)), float("-inf"))
        token = chunk * CHUNK + tl.argmax(score, axis=0)
        if CHUNKS == 1:
            _finish(OUT, OFFSETS, POSITIONS, row, token, offset, ADVANCE)
        else:
            part = (row * CHUNKS + chunk) * 2
            tl.store(PART + part, tl.max(score, axis=0))
            tl.store(PART + part + 1, token.to(tl.float32))  # exact: a vocabulary is below 2**24
            tl.debug_barrier()
            if tl.atomic_add(COUNT + row, 1, sem="acq_rel") == CHUNKS - 1:
                c = tl.arange(0, BLOCK_C)
                parts = (row * CHUNKS + c) * 2
                best = tl.load(PART + parts, mask=c < CHUNKS, other=float("-inf"), cache_modifier=".cg")
                tokens = tl.load(PART + parts + 1, mask=c < CHUNKS, other=0.0, cache_modifier=".cg")
                win = tl.argmax(best, axis=0)
                _finish(OUT, OFFSETS, POSITIONS, row, tl.sum(tl.where(c == win, tokens, 0.0), axis=0), offset,
                        ADVANCE)
                tl.atomic_xchg(COUNT + row, 0)


_HELPERS = ("_mix32_tl", "_uniform_tl", "_ordered_key", "_kth_largest_key", "_nucleus_key", "_row_logits", "_finish")
CHUNK = 4096  # tokens per program of an unfiltered row's argmax (a 128k vocabulary: 32 programs, not one)


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, offsets: torch.Tensor, bitmask: torch.Tensor | None = None,
                  masked: torch.Tensor | None = None, advance: Advance | None = None,
                  chunk_size: int | None = None) -> torch.Tensor:
    """Triton version of `sample_ref` (same hash, same filters, same bitmask, same `advance`): no host sync, fixed
    grid, graph-safe. Without a bitmask the kernel is compiled without the masking code; with `advance` (int64
    contiguous rows) the tokens are stored in place and the counters and positions advanced in the same launch.
    chunk_size: tokens per program of an unfiltered row (default `CHUNK`; a power of two); the reused partials and
    arrival counters are `split_buffers`' (made outside any graph capture)."""
    batch, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    has_mask = bitmask is not None
    if has_mask:
        _check_mask(bitmask, masked, batch)
        if bitmask.stride(-1) != 1:
            bitmask = bitmask.contiguous()
    in_place = advance is not None and all(t.dtype == torch.int64 and t.is_contiguous() and t.shape == (batch,)
                                           for t in (offsets, *advance))
    out = advance[0] if in_place else torch.empty(batch, dtype=torch.int64, device=logits.device)
    positions = advance[1] if in_place else out
    block_v = next_pow2(vocab)
    num_warps = 32 if block_v >= 32768 else 16 if block_v >= 16384 else 8 if block_v >= 4096 else 4
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size={chunk_size}: must be a power of two >= 16")
    chunk = min(CHUNK if chunk_size is None else chunk_size, block_v)
    chunks = -(-vocab // chunk)
    if batch > 0:
        if chunks > 1:
            part, count = split_buffers(logits.device, ("sample", chunks), batch * chunks * 2, batch)
        else:
            part = count = out
        jit_helpers(globals(), _HELPERS)
        launch(_sample_kernel, (batch, chunks),
            logits, temperature.float().contiguous(), top_k.int().contiguous(), top_p.float().contiguous(),
            seeds.long().contiguous(), offsets if in_place else offsets.long().contiguous(), out,
            bitmask if has_mask else out, masked.int().contiguous() if has_mask else out, positions, part, count,
            logits.stride(0), bitmask.stride(0) if has_mask else 0, bitmask.shape[1] if has_mask else 0, vocab,
            BLOCK_V=block_v, CHUNK=chunk, CHUNKS=chunks, BLOCK_C=next_pow2(chunks), HAS_MASK=has_mask,
            ADVANCE=in_place, num_warps=num_warps)
    return out if in_place else advance_ref(out, offsets, advance)


def _check_mask(bitmask: torch.Tensor, masked: torch.Tensor | None, batch: int) -> None:
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.shape[0] != batch:
        raise ValueError(f"bitmask must be int32 [{batch}, W], got {bitmask.dtype} {tuple(bitmask.shape)}")
    if masked is None or masked.shape != (batch,):
        raise ValueError(f"masked must be a [{batch}] per-row flag tensor with the bitmask, got "
                         f"{None if masked is None else tuple(masked.shape)}")
