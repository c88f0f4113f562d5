"""On-device sampling: greedy, temperature, top-k, top-p with counter-based per-request randomness.

Randomness never touches torch's global generator (which breaks concurrent CUDA-graph capture). Each (seed, offset,
vocab index) is hashed to a uniform u in (0, 1) with a 32-bit integer hash (Wellons' lowbias32) that the torch
reference and the Triton kernel implement bit-identically; the token is the exponential-noise argmax
argmax_i p_i / E_i with E_i = -log(u_i), i.e. a sample from p. Filtering keeps token i when
  top-k: fewer than k tokens have a strictly larger logit (ties at the k-th value are all kept), and
  top-p: the renormalised (after top-k) mass of tokens strictly more likely than i is < top_p.
Both are thresholds on the scaled logit, so the kernel finds them by bisection without sorting.
"""
from __future__ import annotations

import torch

from ._triton import jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None

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
    """[B, vocab] fp32 uniforms in (0, 1): 24 random bits + half an ulp, so never 0 or 1."""
    key = row_keys_ref(seeds, offsets)[:, None]
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :]
    bits = _mix32(key ^ _mul32(idx + 1, GOLDEN))
    return ((bits >> 8).float() + 0.5) * (1.0 / 16777216.0)


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32 -> tokens [B] int64. temperature 0 = argmax; top_k 0 and top_p 1.0 = off."""
    logits = logits.float()
    batch, vocab = logits.shape
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]
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
    keep = keep_k & (scaled >= p_threshold)
    noise = -torch.log(uniform_ref(seeds, offsets, vocab))
    score = torch.where(keep, scaled - torch.log(noise), torch.full_like(scaled, float("-inf")))
    sampled = torch.argmax(score, dim=-1)
    return torch.where(greedy, torch.argmax(logits, dim=-1), sampled)
