"""One-shot all-reduce over peer buffers, for the small sums of tensor parallelism on GPUs joined by NVLink.

Every rank owns one buffer that every other rank can read and write (PyTorch symmetric memory maps it into each
rank's address space; no multicast). One call, `peer_all_reduce`, is one kernel of G programs on every rank (G the
same on every rank: it depends on the message size only). Program p of rank r:

1. waits for the kernel before it (PDL), copies its chunks of the input into rank r's buffer;
2. sets flag [parity, p, r] in every other rank's buffer (a release store at system scope: the copies are visible
   to the peers before the flag is);
3. waits for flag [parity, p, s] of every other rank s in its own buffer to become 1 and resets it (an acquire
   compare-and-swap: the peer's copies are visible after it);
4. sums its chunks over the ranks, in rank order on every rank (so every rank gets the same bits), into the output.

Program p of each rank only reads the chunks program p of the other ranks wrote, so no grid-wide barrier is needed.
A chunk always belongs to the same program whatever the message size and dtype: chunk c (the input's BLOCK elements
at c * BLOCK; in the buffer at byte c * BLOCK * SLOT_BYTES) to program c mod MAX_PROGRAMS (G is the number of chunks
up to MAX_PROGRAMS, then MAX_PROGRAMS).
Reuse: program p alternates between two halves of the buffer (and two sets of flags) by the parity of a counter of
its own calls, kept on the device (so graph replays and eager calls keep it alike). Before program p writes a half
again it has passed the handshake of its call between, which a peer's program p only joins after the peer's whole
previous kernels (the one that read that half among them) have finished: the stream's order, and `gdc_wait` under
PDL. Counters of different programs drift apart (a small message runs fewer programs), which is safe because of the
fixed ownership: only program p ever writes or reads its chunks, and only at its own parity.
G is at most `MAX_PROGRAMS`, few enough to be resident at once beside any other kernel, so the programs a handshake
waits for are always running.

The torch reference is the sum over ranks (`peer_all_reduce_ref`); the tests run the kernel under the interpreter
with the peer's half of the handshake played by the test, on one GPU as two ranks on two streams (with message sizes
that change the number of programs between calls), and on two GPUs inside the tensor-parallel engine.
"""
from __future__ import annotations

import torch

from ._triton import cdiv, launch, pdl_enter

tl = None  # triton.language, bound on first launch (see _triton.py)

MAX_PROGRAMS = 32
BLOCK = 1024  # elements per chunk: 4 warps x 32 threads x 8 (one 16-byte access per thread in 16-bit types)
NUM_WARPS = 4
# bytes of a buffer half per element, whatever the message's dtype: chunk c sits at byte c * BLOCK * SLOT_BYTES, so a
# chunk's bytes belong to one program even when consecutive calls differ in dtype (float32 partials beside float16
# sums under HYBRID_ENGINE_TP_SUM=float32)
SLOT_BYTES = 4
# tries of a handshake's compare-and-swap per second of timeout (one try: a system-scope atomic and two barriers;
# tests/kernels/test_peer_all_reduce.py prints what a try takes on the card it runs on: 0.35 us on the H200, on its
# own memory). Tries that are faster shorten the timeout in proportion; a live peer answers in microseconds
SPINS_PER_S = 3_000_000


def peer_all_reduce_ref(parts: list[torch.Tensor], out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The sum of every rank's input, in float32 in rank order, rounded once to `out_dtype` (default: the inputs')."""
    acc = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for p in parts:
        acc += p.float()
    return acc.to(out_dtype or parts[0].dtype)


def flag_words(world_size: int) -> int:
    """int32 flags one rank's buffer holds: [2 parities, MAX_PROGRAMS, world_size]."""
    return 2 * MAX_PROGRAMS * world_size


def programs_for(numel: int) -> int:
    return min(cdiv(numel, BLOCK), MAX_PROGRAMS)


def _one_shot_kernel(X, OUT, DATA, FLAGS, CALLS, ABANDONED, rank, n, half_elems, spin_limit, WORLD: tl.constexpr,
                     MAX_PROGRAMS: tl.constexpr, BLOCK: tl.constexpr, SPREAD: tl.constexpr,
                     PDL: tl.constexpr = 0):
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    pdl_enter(PDL)  # the input is the previous kernel's output; CALLS and the flags its previous call's
    calls = tl.load(CALLS + pid)
    parity = calls % 2
    base = parity.to(tl.int64) * half_elems
    ty = X.dtype.element_ty
    own = tl.multiple_of(tl.load(DATA + rank).to(tl.pointer_type(ty)), 16)  # the areas are 16-byte aligned
    for start in range(pid * BLOCK, n, progs * BLOCK):
        offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
        mask = offs < n
        slots = base + tl.multiple_of(start * SPREAD, BLOCK) + tl.arange(0, BLOCK)  # chunk c at byte c * BLOCK * 4
        tl.store(own + slots, tl.load(X + offs, mask=mask), mask=mask)
    tl.debug_barrier()  # every thread's copies are done before one thread releases them
    flag_at = (parity * MAX_PROGRAMS + pid) * WORLD
    for r in tl.static_range(WORLD):
        if r != rank:
            peer_flags = tl.load(FLAGS + r).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(peer_flags + flag_at + rank, 1, sem="release", scope="sys")
    own_flags = tl.load(FLAGS + rank).to(tl.pointer_type(tl.int32))
    for r in tl.static_range(WORLD):
        if r != rank:
            # a bounded number of tries (every thread of the program takes the same decision: the compare-and-swap's
            # result is broadcast, a timer read per thread would not be), then give up and say so (a dead peer)
            spins = 0
            waiting = True
            while waiting:
                waiting = tl.atomic_cas(own_flags + flag_at + r, 1, 0, sem="acquire", scope="sys") != 1
                spins += 1
                if waiting and spins >= spin_limit:
                    tl.store(ABANDONED, 1)
                    waiting = False
    tl.debug_barrier()  # no thread reads a peer's chunk before the acquire above
    for start in range(pid * BLOCK, n, progs * BLOCK):
        offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
        mask = offs < n
        slots = base + tl.multiple_of(start * SPREAD, BLOCK) + tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            src = tl.multiple_of(tl.load(DATA + r).to(tl.pointer_type(ty)), 16)
            acc += tl.load(src + slots, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)
    tl.store(CALLS + pid, calls + 1)


def peer_all_reduce(x: torch.Tensor, out: torch.Tensor, data_ptrs: torch.Tensor, flag_ptrs: torch.Tensor,
                    calls: torch.Tensor, abandoned: torch.Tensor, rank: int, half_bytes: int,
                    timeout_s: float = 10.0) -> torch.Tensor:
    """Sum `x` (contiguous) over the ranks into `out` (contiguous, same shape; its dtype may be narrower: one
    rounding of the float32 sum). `data_ptrs` / `flag_ptrs`: int64 [world] addresses of every rank's data area
    (two halves of `half_bytes`) and flag area (`flag_words` int32, zero at first) as mapped in this process;
    `calls`: int32 [MAX_PROGRAMS] of this rank, zero at first, used by this communicator's calls only.
    A program that has waited about `timeout_s` for a peer (counted in tries, `SPINS_PER_S` a second: at least that
    long where a try takes longer) stops waiting, writes 1 into `abandoned` (an int32 the host can read without
    waiting for the GPU: pinned host memory) and leaves its output wrong; the host must treat that as the group's
    failure."""
    n = x.numel()
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"peer all-reduce sums 16- and 32-bit floats; got {x.dtype}")
    need = cdiv(n, BLOCK) * BLOCK * SLOT_BYTES
    if need > half_bytes:
        raise ValueError(f"a message of {n} elements takes {need} bytes of a peer-buffer half ({SLOT_BYTES} an "
                         f"element, whatever the dtype); the halves hold {half_bytes}: use NCCL above that size")
    if out.numel() != n or not (x.is_contiguous() and out.is_contiguous()):
        raise ValueError(f"x {tuple(x.shape)} and out {tuple(out.shape)} must be contiguous and the same size")
    if n:
        world = data_ptrs.numel()
        # odd and >= 3, so that Triton specialises every limit alike (it specialises ints equal to 1 or divisible by
        # 16): a new variant would be compiled and loaded, and loading waits for the kernels running on the card
        spin_limit = min(max(3, int(timeout_s * SPINS_PER_S)), 2 ** 31 - 1) | 1
        launch(_one_shot_kernel, (programs_for(n),), x, out, data_ptrs, flag_ptrs, calls, abandoned, rank, n,
               half_bytes // x.element_size(), spin_limit, WORLD=world, MAX_PROGRAMS=MAX_PROGRAMS, BLOCK=BLOCK,
               SPREAD=SLOT_BYTES // x.element_size(), num_warps=NUM_WARPS)
    return out
