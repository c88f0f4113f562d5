"""Programmatic dependent launch (PDL): which launches opt in, the mode's rules, and on a Hopper card that a chain of
dependent kernels (each reading what the one before wrote), replayed from a CUDA graph, gives bitwise what the same
chain gives without PDL."""
import pytest
import torch
from kernel_helpers import rand

from hybrid_engine.kernels import _triton, decode_gemm, gemv
from hybrid_engine.kernels._workspace import capture_graph
from hybrid_engine.kernels.rms_norm import rms_norm_triton

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _mode_restored():
    yield
    _triton.set_pdl_mode(None)


def _plain(X, OUT):  # a kernel function that does not take PDL
    pass


def _opted_in(X, OUT, PDL=0):  # noqa: N803
    pass


def test_only_kernels_taking_pdl_get_its_keywords(monkeypatch):
    monkeypatch.setattr(_triton, "_pdl_capable", lambda: True)
    _triton.set_pdl_mode(2)
    assert _triton._pdl_kw(_plain) == {}
    assert _triton._pdl_kw(_opted_in) == {"PDL": 2, "launch_pdl": True}
    _triton.set_pdl_mode(0)
    assert _triton._pdl_kw(_opted_in) == {}


def test_mode_from_the_environment_and_its_errors(monkeypatch):
    monkeypatch.setattr(_triton, "_pdl_capable", lambda: True)
    for value, mode in (("0", 0), ("off", 0), ("1", 1), ("2", 2), ("on", 2)):
        monkeypatch.setenv("HYBRID_ENGINE_PDL", value)
        assert _triton.pdl_mode() == mode
    monkeypatch.setenv("HYBRID_ENGINE_PDL", "3")
    with pytest.raises(ValueError, match="HYBRID_ENGINE_PDL='3'.*0 \\(off\\), 1 \\(wait first\\), 2"):
        _triton.pdl_mode()
    with pytest.raises(ValueError, match="PDL mode 5"):
        _triton.set_pdl_mode(5)


def test_off_where_the_card_cannot(monkeypatch):
    monkeypatch.setattr(_triton, "_pdl_capable", lambda: False)
    monkeypatch.setenv("HYBRID_ENGINE_PDL", "2")
    assert _triton.pdl_mode() == 0
    _triton.set_pdl_mode(2)
    assert _triton.pdl_mode() == 0


def _chain(x, res, norm_w, w1, w2, w3, steps):
    """rms_norm -> GEMV (split-K) -> GEMV -> GEMV, `steps` times, each step reading the previous one's output."""
    for _ in range(steps):
        h, res = rms_norm_triton(x, norm_w, 1e-5, res)
        h = gemv.gemv_triton(h, w1, None, (16, 128, 4, 1, 4))
        h = gemv.gemv_triton(h, w2, None, (8, 256, 4, 1, 1), silu_mul=True)
        x = gemv.gemv_triton(h, w3, None, (4, 512, 4, 1, 1))
    return x, res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="PDL needs a card of compute capability >= 9.0")
@pytest.mark.parametrize("mode", [1, 2])
def test_dependent_chain_in_a_graph_matches_no_pdl(mode):
    hidden, inter = 1000, 1718  # odd sizes: masked tiles
    x = rand(1, hidden, dtype=torch.float16, device="cuda", seed=1)
    res = rand(1, hidden, dtype=torch.float16, device="cuda", seed=2)
    norm_w = rand(hidden, dtype=torch.float16, device="cuda", seed=3)
    w1 = rand(2 * inter, hidden, dtype=torch.float16, device="cuda", seed=4, scale=0.05)
    w2 = rand(hidden, inter, dtype=torch.float16, device="cuda", seed=5, scale=0.05)
    w3 = rand(hidden, hidden, dtype=torch.float16, device="cuda", seed=6, scale=0.05)
    _assert_matches_pdl_off(lambda: _chain(x, res, norm_w, w1, w2, w3, steps=6), mode)


def _assert_matches_pdl_off(run, mode, finite=False):
    """`run()` (a chain of dependent launches returning its outputs) under PDL `mode`, replayed three times from a
    graph (outputs poisoned with NaN before each replay) and once eagerly, equals bitwise what it gives with PDL
    off; with `finite`, that reference must hold no NaN/inf (equal NaNs would not compare equal)."""
    _triton.set_pdl_mode(0)
    want = run()
    if finite:
        assert all(torch.isfinite(t).all() for t in want)
    _triton.set_pdl_mode(mode)
    graph, got = capture_graph(run)
    for _ in range(3):
        for t in got:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    for a, b in zip(run(), want):
        assert torch.equal(a, b)


def _decode_chain(x, w1, w2, w3, steps):
    """The decode GEMM (the batch-invariant projections) on 5 rows: split-K with a SiLU-mul epilogue, swap-AB,
    plain with a masked K tail, `steps` times, each launch reading the previous one's output (two steps: with
    these weights a third would overflow float16)."""
    for _ in range(steps):
        h = decode_gemm.decode_silu_triton(x, w1, (16, 128, 3, 4, 2, 0))
        h = decode_gemm.decode_gemm_triton(h, w2, None, (64, 64, 2, 4, 3, 1))
        x = decode_gemm.decode_gemm_triton(h, w3, None, (16, 256, 1, 4, 2, 0))
    return (x,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="PDL needs a card of compute capability >= 9.0")
@pytest.mark.parametrize("mode", [1, 2])
def test_decode_gemm_chain_in_a_graph_matches_no_pdl(mode):
    """With PDL 2 the decode GEMM reads its first weight tiles before waiting for the kernel before it: the rows'
    sums must stay bitwise those of PDL off (same MMAs in the same order), from a graph and eagerly."""
    hidden, inter = 1000, 1718  # odd sizes: masked K tails and N tiles
    x = rand(5, hidden, dtype=torch.float16, device="cuda", seed=11)
    w1 = rand(2 * inter, hidden, dtype=torch.float16, device="cuda", seed=12, scale=0.05)
    w2 = rand(hidden, inter, dtype=torch.float16, device="cuda", seed=13, scale=0.05)
    w3 = rand(hidden, hidden, dtype=torch.float16, device="cuda", seed=14, scale=0.05)
    _assert_matches_pdl_off(lambda: _decode_chain(x, w1, w2, w3, steps=2), mode, finite=True)
