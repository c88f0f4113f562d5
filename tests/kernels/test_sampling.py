"""Sampling: greedy, seeded reproducibility, top-k/top-p filters, distribution, reference == Triton tokens."""
import pytest
import torch
from kernel_helpers import GPU

from hybrid_engine.kernels.sampling import sample_ref, sample_triton, uniform_ref


def params(batch, temperature=1.0, top_k=0, top_p=1.0, seed=0, offset=0, device="cpu"):
    def full(value, dtype):
        t = torch.as_tensor(value, dtype=dtype)
        return (t.expand(batch) if t.dim() == 0 else t).clone().to(device)

    return (full(temperature, torch.float32), full(top_k, torch.int32), full(top_p, torch.float32),
            full(seed, torch.int64), full(offset, torch.int64))


def mixed_case(device="cpu", vocab=257, batch=16):
    """Rows covering greedy, plain temperature, top-k, top-p, both, huge seeds and offsets."""
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(batch, vocab, generator=gen) * 2.5).to(device)
    temperature = [0.0, 1.0, 0.7, 1.3, 1.0, 0.5, 2.0, 1.0, 0.9, 1.0, 0.0, 1.0, 0.8, 1.1, 1.0, 0.6][:batch]
    top_k = [0, 0, 0, 1, 5, 40, 0, 0, 20, 300, 3, 2, 0, 7, 0, 100][:batch]
    top_p = [1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.5, 0.95, 0.8, 0.3, 1.0, 1.0, 0.05, 1.0, 0.99, 0.7][:batch]
    seeds = [0, 1, 2, 3, 2**40 + 5, -9, 12345, 6, 7, 8, 9, 10, 2**62, 12, 13, 14][:batch]
    offsets = [0, 5, 9, 2**33, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2**50][:batch]
    return (logits, *params(batch, temperature, top_k, top_p, seeds, offsets, device))


def test_greedy_ties_take_lowest_index():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, -0.5]])
    args = params(3, temperature=0.0)
    want = torch.argmax(logits, dim=-1)
    assert torch.equal(sample_ref(logits, *args), want)
    assert torch.equal(sample_triton(logits, *args), want)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_never_give_a_token_outside_the_vocabulary(temperature):
    """A NaN logit counts as -inf: a row with some NaNs draws among the others, a row of only NaNs gets token 0 (an
    out-of-range id would fail the next step's embedding lookup for every row), other rows are untouched; the
    reference and the Triton kernel agree."""
    logits, *rest = mixed_case(batch=4, vocab=300)
    logits[1, :] = float("nan")
    logits[2, ::2] = float("nan")
    logits[2, 7] = 50.0  # the clear maximum among the finite ones
    p = params(4, temperature, 0, 1.0, [1, 2, 3, 4], 0)
    clean = sample_ref(torch.where(logits.isnan(), torch.full_like(logits, -1e30), logits), *p)
    for sample in (sample_ref, sample_triton):
        out = sample(logits, *p)
        assert out.tolist()[1] == 0 and out.tolist()[2] == 7, sample.__name__
        assert out[[0, 3]].tolist() == clean[[0, 3]].tolist(), sample.__name__
        assert ((out >= 0) & (out < 300)).all()


def test_reference_equals_triton():
    case = mixed_case()
    want = sample_ref(*case)
    assert torch.equal(sample_triton(*case), want)
    assert torch.equal(want[[0, 10]], torch.argmax(case[0][[0, 10]], dim=-1))  # temperature 0 rows


def test_seeded_reproducible_and_offsets_vary():
    logits = torch.zeros(64, 50)  # uniform distribution: the token is pure noise
    a = sample_ref(logits, *params(64, seed=42, offset=torch.arange(64)))
    b = sample_ref(logits, *params(64, seed=42, offset=torch.arange(64)))
    c = sample_ref(logits, *params(64, seed=43, offset=torch.arange(64)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a.tolist())) > 20  # different offsets give different draws


def test_top_k_1_is_greedy():
    logits = torch.randn(12, 101, generator=torch.Generator().manual_seed(3)) * 4
    args = params(12, temperature=1.5, top_k=1, seed=torch.arange(12))
    want = torch.argmax(logits, dim=-1)
    assert torch.equal(sample_ref(logits, *args), want)
    assert torch.equal(sample_triton(logits, *args), want)


def test_no_global_generator_used():
    state = torch.get_rng_state()
    sample_ref(*mixed_case(batch=4))
    sample_triton(*mixed_case(batch=4))
    assert torch.equal(torch.get_rng_state(), state)


def test_extreme_hashes_stay_inside_the_open_interval():
    from hybrid_engine.kernels.sampling import bits_to_uniform_ref

    u = bits_to_uniform_ref(torch.tensor([0, 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=torch.int64))
    assert (u > 0).all() and (u < 1).all(), u
    assert torch.isfinite(torch.log(-torch.log(u))).all()


def test_uniforms_in_open_interval():
    u = uniform_ref(torch.arange(8), torch.arange(8) * 1000, 4096)
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01


def chi_square(tokens, probs):
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * n
    nz = expected > 0
    assert counts[~nz].sum() == 0, "sampled a token with probability 0"
    return (((counts[nz] - expected[nz]) ** 2) / expected[nz]).sum().item(), int(nz.sum()) - 1


# chi-square critical values at p = 0.001 for the degrees of freedom used below
CRITICAL = {2: 13.8, 3: 16.3, 7: 24.3}


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8)])
def test_distribution(temperature, top_k, top_p):
    """20k draws over many offsets follow softmax(logits / T) restricted by top-k / top-p."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.3, -1.0, 0.2, 1.3, -2.0])
    n = 20000
    tokens = sample_ref(logits.expand(n, -1), *params(n, temperature, top_k, top_p, seed=11,
                                                      offset=torch.arange(n)))
    probs = torch.softmax(logits / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    keep = torch.zeros(8, dtype=torch.bool)
    if top_k:
        keep[order[:top_k]] = True
    elif top_p < 1.0:
        above = torch.cumsum(probs[order], 0) - probs[order]
        keep[order[above < top_p]] = True
    else:
        keep[:] = True
    probs = torch.where(keep, probs, 0.0)
    stat, dof = chi_square(tokens, probs / probs.sum())
    assert stat < CRITICAL[dof], f"chi-square {stat:.1f} with {dof} dof"


@GPU[0]
@GPU[1]
def test_gpu_equals_cpu_reference():
    """CPU reference, GPU reference and GPU Triton kernel give the same tokens (LLaMA vocab, many rows)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 32000, generator=gen) * 3
    temperature = torch.rand(64, generator=gen) + 0.3
    temperature[:4] = 0
    top_k = torch.randint(0, 60, (64,), generator=gen, dtype=torch.int32)
    top_p = torch.where(torch.rand(64, generator=gen) < 0.5, torch.rand(64, generator=gen) * 0.9 + 0.1, 1.0)
    seeds, offsets = torch.arange(64) * 7919, torch.arange(64) + 10**6
    want = sample_ref(logits, temperature, top_k, top_p, seeds, offsets)
    cuda = [t.cuda() for t in (logits, temperature, top_k, top_p, seeds, offsets)]
    assert torch.equal(sample_ref(*cuda).cpu(), want)
    assert torch.equal(sample_triton(*cuda).cpu(), want)


@GPU[0]
@GPU[1]
def test_gpu_triton_distribution():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.3, -1.0, 0.2, 1.3, -2.0], device="cuda")
    n = 100000
    tokens = sample_triton(logits.expand(n, -1).contiguous(), *params(n, 1.0, seed=3, offset=torch.arange(n),
                                                                      device="cuda"))
    stat, dof = chi_square(tokens.cpu(), torch.softmax(logits.cpu(), dim=-1))
    assert stat < CRITICAL[dof]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_advance_in_the_same_launch(device):
    """advance=(tokens, positions): each row's token lands in `tokens`, its counter and position go one on, and the
    draw used the counter before the step (the same tokens as without `advance`); the reference does the same with
    torch ops. A counter that is not int64 contiguous is advanced outside the kernel, with the same result."""
    logits, *p = mixed_case(device)
    want = sample_ref(logits, *p)
    for sample in (sample_ref, sample_triton):
        offsets = p[4].clone()
        tokens = torch.full_like(want, -1)
        positions = torch.arange(want.numel(), device=device) * 7
        got = sample(logits, *p[:4], offsets, advance=(tokens, positions))
        assert got.data_ptr() == tokens.data_ptr() and torch.equal(tokens, want), sample.__name__
        assert torch.equal(offsets, p[4] + 1)
        assert torch.equal(positions, torch.arange(want.numel(), device=device) * 7 + 1)
    strided = torch.stack([p[4], p[4]], dim=1)[:, 0]  # not contiguous: the kernel gets a copy, the add runs after
    tokens, positions = torch.full_like(want, -1), torch.zeros_like(want)
    sample_triton(logits, *p[:4], strided, advance=(tokens, positions))
    assert torch.equal(tokens, want) and torch.equal(strided, p[4] + 1)
    assert torch.equal(positions, torch.ones_like(want))


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_unfiltered_rows_argmax_in_chunks(chunk_size):
    """Rows without top-k / top-p (greedy, and temperature alone) are argmaxes over chunks of the vocabulary, merged
    by the last-arriving program: the same tokens as the reference, with ties across chunks going to the lowest
    index, rows of NaN to token 0, bitmasked rows respected, `advance` applied once per row, and the arrival
    counters left at zero for the next call (run twice on the same workspace)."""
    from hybrid_engine.kernels import _workspace

    _workspace.clear_split_buffers()
    logits, *p = mixed_case(vocab=257)
    logits[0, [3, 200]] = 40.0  # a greedy row's tie across chunks: the lowest index wins
    logits[10, :] = float("nan")  # a greedy row of NaN: token 0
    bitmask = torch.zeros(16, 9, dtype=torch.int32)
    bitmask[:, 5] = 0b1011  # tokens 160, 161, 163 allowed in flagged rows
    masked = torch.tensor([1, 1, 0, 0] * 4, dtype=torch.int32)
    want = sample_ref(logits, *p, bitmask, masked)
    assert int(want[0]) in (160, 161, 163) and int(want[10]) == 0  # row 0 flagged, row 10 not
    for _ in range(2):
        offsets, tokens, positions = p[4].clone(), torch.full_like(want, -1), torch.zeros_like(want)
        got = sample_triton(logits, *p[:4], offsets, bitmask, masked, advance=(tokens, positions),
                            chunk_size=chunk_size)
        assert torch.equal(got, want)
        assert torch.equal(offsets, p[4] + 1) and torch.equal(positions, torch.ones_like(want))
    unmasked = sample_ref(logits, *p)
    assert unmasked[0] == 3 and unmasked[10] == 0
    assert torch.equal(sample_triton(logits, *p, chunk_size=chunk_size), unmasked)
    (key,) = [k for k in _workspace._SPLIT_BUFFERS if "sample" in k]
    assert int(_workspace._SPLIT_BUFFERS[key][1].abs().sum()) == 0
    with pytest.raises(ValueError, match="chunk_size=48"):
        sample_triton(logits, *p, chunk_size=48)
