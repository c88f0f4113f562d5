"""The one-shot peer all-reduce kernel (kernels/allreduce.py) on one device: rank 0 of two with the peer's half of
the handshake (its chunks in its buffer, its flags in ours) played by the test, and on a GPU both ranks at once on
two streams."""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import GPU

from hybrid_engine.kernels import allreduce as ar

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _areas(device, half_bytes: int, world: int):
    data = [torch.zeros(2 * half_bytes, dtype=torch.uint8, device=device) for _ in range(world)]
    flags = [torch.zeros(ar.flag_words(world), dtype=torch.int32, device=device) for _ in range(world)]
    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device)  # noqa: E731
    return data, flags, ptrs(data), ptrs(flags)


def _flag(flags: torch.Tensor, world: int, parity: int, program: int, src: int) -> torch.Tensor:
    return flags.view(2, ar.MAX_PROGRAMS, world)[parity, program, src]


def _chunks(area: torch.Tensor, half: int, parity: int, dtype: torch.dtype, n: int):
    """(buffer view, input slice) of each chunk of an n-element message in one half of a rank's data area: chunk c at
    byte c * BLOCK * SLOT_BYTES, whatever the dtype."""
    size = torch.empty(0, dtype=dtype).element_size()
    for c in range(0, n, ar.BLOCK):
        lo = parity * half + c * ar.SLOT_BYTES
        m = min(ar.BLOCK, n - c)
        yield area[lo:lo + m * size].view(dtype), slice(c, c + m)


@pytest.mark.parametrize("dtype,out_dtype,n", [
    (torch.float16, torch.float16, 1000), (torch.float32, torch.float16, 2500), (torch.float16, torch.float16, 2500),
    pytest.param(torch.bfloat16, torch.bfloat16, 77, marks=GPU)])  # the interpreter rounds to bfloat16 by truncation
def test_one_shot_sums_with_the_peer_and_keeps_the_handshake(dtype, out_dtype, n):
    world, rank, half = 2, 0, 16384
    gen = torch.Generator().manual_seed(n)
    data, flags, data_ptrs, flag_ptrs = _areas(DEVICE, half, world)
    calls = torch.zeros(ar.MAX_PROGRAMS, dtype=torch.int32, device=DEVICE)
    progs = ar.programs_for(n)
    abandoned = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for call in range(3):  # parity 0, 1, 0: the halves and flags alternate
        parity = call % 2
        x = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
        y = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
        for view, part in _chunks(data[1], half, parity, dtype, n):
            view.copy_(y[part])  # the peer's copy-in ...
        for p in range(progs):
            _flag(flags[0], world, parity, p, 1).fill_(1)  # ... and its release of it
        out = torch.empty(n, dtype=out_dtype, device=DEVICE)
        ar.peer_all_reduce(x, out, data_ptrs, flag_ptrs, calls, abandoned, rank, half)
        torch.testing.assert_close(out, ar.peer_all_reduce_ref([x, y], out_dtype), rtol=0, atol=0)
        for view, part in _chunks(data[0], half, parity, dtype, n):
            assert torch.equal(view, x[part])  # what the peer reads
        for p in range(progs):
            assert _flag(flags[0], world, parity, p, 1).item() == 0  # consumed
            assert _flag(flags[1], world, parity, p, 0).item() == 1  # the peer's to consume
            _flag(flags[1], world, parity, p, 0).fill_(0)
        assert calls[:progs].tolist() == [call + 1] * progs and not calls[progs:].any()
    assert int(flags[0].sum()) == 0 and int(flags[1].sum()) == 0 and abandoned.item() == 0


def test_programs_are_capped():
    assert ar.programs_for(1) == 1
    assert ar.programs_for(ar.BLOCK + 1) == 2
    assert ar.programs_for(10 ** 7) == ar.MAX_PROGRAMS


def test_a_message_larger_than_the_buffer_is_refused():
    x = torch.zeros(600, dtype=torch.float16, device=DEVICE)
    ptrs = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    calls = torch.zeros(ar.MAX_PROGRAMS, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="600 elements takes 4096 bytes .* halves hold 1024"):
        ar.peer_all_reduce(x, torch.empty_like(x), ptrs, ptrs, calls, calls, 0, 1024)
    with pytest.raises(ValueError, match="same size"):
        ar.peer_all_reduce(x[:10], torch.empty(9, dtype=x.dtype), ptrs, ptrs, calls, calls, 0, 8192)
    with pytest.raises(ValueError, match="16- and 32-bit floats; got torch.float64"):
        ar.peer_all_reduce(x.double(), x.double(), ptrs, ptrs, calls, calls, 0, 8192)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
def test_two_ranks_on_one_gpu_in_two_streams(graphs):
    """Both ranks' kernels on one card, each on its own stream (they run at once, as on two cards): every call of a
    sequence of sizes (1 to MAX_PROGRAMS programs, so the programs' call counters drift apart) sums both inputs on
    both ranks, bit for bit the same, with no handshake left over; captured in one graph per rank and replayed
    twice, the same."""
    world, half = 2, 1 << 20
    gen = torch.Generator().manual_seed(7)
    data, flags, data_ptrs, flag_ptrs = _areas(DEVICE, half, world)
    calls = [torch.zeros(ar.MAX_PROGRAMS, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    abandoned = [torch.zeros(1, dtype=torch.int32).pin_memory() for _ in range(world)]
    sizes = [4096, 777, ar.BLOCK * ar.MAX_PROGRAMS * 3 + 5, 4096, 1, 65536, 8192, 4096]
    dtypes = [torch.float16, torch.float32, torch.float16, torch.float32, torch.float16, torch.float32,
              torch.float16, torch.bfloat16]  # float32 partials beside float16 sums share the halves' chunks
    inputs = [[torch.randn(n, generator=gen).to(dt).to(DEVICE) for n, dt in zip(sizes, dtypes)] for _ in range(world)]
    outs = [[torch.empty(n, dtype=torch.bfloat16 if dt == torch.bfloat16 else torch.float16, device=DEVICE)
             for n, dt in zip(sizes, dtypes)] for _ in range(world)]
    streams = [torch.cuda.Stream(DEVICE) for _ in range(world)]
    torch.cuda.synchronize()

    def call(rank, i):
        ar.peer_all_reduce(inputs[rank][i], outs[rank][i], data_ptrs, flag_ptrs, calls[rank], abandoned[rank], rank,
                           half, timeout_s=5.0)

    def enqueue():
        for i in range(len(sizes)):  # call by call, both ranks
            for rank in range(world):
                with torch.cuda.stream(streams[rank]):
                    call(rank, i)

    # Every kernel variant (by size and rank) compiled and loaded first, each giving up at once (no peer yet): loading
    # a module waits for the kernels running on the card, here the other rank's (one process drives both ranks; on
    # two cards each rank loads its own, at its first capture). Then the state is reset.
    for rank in range(world):
        for x, out in zip(inputs[rank], outs[rank]):
            ar.peer_all_reduce(x, out, data_ptrs, flag_ptrs, calls[rank], abandoned[rank], rank, half, timeout_s=0)
    torch.cuda.synchronize()
    for t in (*flags, *calls, *abandoned):
        t.zero_()
    if graphs:
        captured = []
        for rank in range(world):  # capture runs nothing: one rank at a time is fine
            g = torch.cuda.CUDAGraph()
            with torch.cuda.stream(streams[rank]):
                g.capture_begin(capture_error_mode="thread_local")
                for i in range(len(sizes)):
                    call(rank, i)
                g.capture_end()
            captured.append(g)
    for _ in range(2 if graphs else 3):
        if graphs:
            for rank in range(world):
                with torch.cuda.stream(streams[rank]):
                    captured[rank].replay()
        else:
            enqueue()
        torch.cuda.synchronize()
        assert [int(a[0]) for a in abandoned] == [0, 0]
        for i, n in enumerate(sizes):
            want = ar.peer_all_reduce_ref([inputs[0][i], inputs[1][i]], outs[0][i].dtype)
            assert torch.equal(outs[0][i], want) and torch.equal(outs[1][i], want), f"call {i} ({n} elements)"
            for rank in range(world):
                outs[rank][i].fill_(float("nan"))
    assert int(flags[0].sum()) == 0 and int(flags[1].sum()) == 0
    assert torch.equal(calls[0], calls[1])


def test_a_peer_that_never_comes_is_given_up_on():
    """No peer: every program stops after its tries and says so in `abandoned` (host-readable); on a GPU, what a try
    takes is printed (SPINS_PER_S assumes 1/3 us)."""
    import time

    world, half, n = 2, 16384, 3000
    data, flags, data_ptrs, flag_ptrs = _areas(DEVICE, half, world)  # the areas stay referenced: pointers only
    calls = torch.zeros(ar.MAX_PROGRAMS, dtype=torch.int32, device=DEVICE)
    cuda = DEVICE.type == "cuda"
    abandoned = torch.zeros(1, dtype=torch.int32)
    abandoned = abandoned.pin_memory() if cuda else abandoned
    x = torch.ones(n, dtype=torch.float16, device=DEVICE)
    timeout_s = 0.2 if cuda else 20 / ar.SPINS_PER_S
    ar.peer_all_reduce(x, torch.empty_like(x), data_ptrs, flag_ptrs, calls, abandoned, 0, half, timeout_s=1e-6)
    abandoned.zero_()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ar.peer_all_reduce(x, torch.empty_like(x), data_ptrs, flag_ptrs, calls, abandoned, 0, half, timeout_s=timeout_s)
    if cuda:
        torch.cuda.synchronize()
        took = time.perf_counter() - t0
        print(f"gave up after {took:.3f} s for {timeout_s} s of tries: {took / timeout_s:.2f} us a try")
    assert abandoned.item() == 1 and int(flags[0].sum()) == 0  # nothing came, nothing consumed
    assert int(flags[1].sum()) == 2 * ar.programs_for(n)  # each program's release, twice
    assert calls[:ar.programs_for(n)].tolist() == [2] * ar.programs_for(n)


COMM_SCRIPT = r'''
import json, os, torch
import torch.distributed as dist
from hybrid_engine.distributed.comm import Communicator, init_group
init_group(0, 1, "tcp://127.0.0.1:" + os.environ["PORT"], torch.device("cuda", 0))
out = {}
x = torch.randn(3000, device="cuda").half()
for method in ("nccl", "symm", "peer"):
    comm = Communicator(torch.device("cuda", 0), method=method)
    y = torch.empty_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        src = x.clone()
        g.capture_begin(capture_error_mode="thread_local")
        y.copy_(comm.all_reduce(src, out_dtype=torch.float16))
        g.capture_end()
    g.replay()
    torch.cuda.synchronize()
    eager = comm.all_reduce(x.clone())
    out[method] = [comm.method, torch.equal(y, x), torch.equal(eager, x)]
print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
'''


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_communicator_methods_in_a_one_rank_group():
    """The communicator's plumbing for each method (buffers made and registered, the captured and the eager path) in
    a one-rank NCCL group, where a sum over the ranks is the input itself."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hybrid_engine.distributed.executor import _free_port

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PORT": str(_free_port()),
           "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", COMM_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=180)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out == {m: [m, True, True] for m in ("nccl", "symm", "peer")}
