"""Grammar-masked sampling: the packed bitmask and per-row flag of `sample_ref` / `sample_triton`.

Flagged rows sample only allowed tokens (whatever the temperature, top-k and top-p), unflagged rows give exactly
the tokens of an unmasked call, and the Triton kernel gives the reference's tokens on odd vocabulary sizes."""
import pytest
import torch
from kernel_helpers import GPU
from test_sampling import mixed_case

from hybrid_engine.kernels.sampling import allowed_ref, sample_ref, sample_triton


def pack(allowed: torch.Tensor, words: int | None = None) -> torch.Tensor:
    """[B, V] bool -> [B, W] int32 packed as llguidance packs it (bit t % 32 of word t // 32)."""
    batch, vocab = allowed.shape
    words = words if words is not None else (vocab + 31) // 32
    bits = torch.zeros(batch, words * 32, dtype=torch.int64)
    n = min(vocab, words * 32)
    bits[:, :n] = allowed[:, :n].long()
    weights = (1 << torch.arange(32, dtype=torch.int64))
    packed = (bits.view(batch, words, 32) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def random_allowed(batch: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows of different density: a few tokens, about half, all but a few, and exactly one."""
    gen = torch.Generator().manual_seed(seed)
    density = torch.tensor([0.02, 0.5, 0.97, 0.2] * batch)[:batch, None]
    allowed = torch.rand(batch, vocab, generator=gen) < density
    allowed[:, int(torch.randint(vocab, (1,), generator=gen))] = True  # at least one token per row
    allowed[batch - 1] = False
    allowed[batch - 1, vocab // 3] = True  # the last row allows a single token
    return allowed


def test_pack_round_trips():
    allowed = random_allowed(5, 77, seed=0)
    assert torch.equal(allowed_ref(pack(allowed), 77), allowed)
    assert not allowed_ref(pack(allowed, words=2), 77)[:, 64:].any()  # columns past 32 * W are disallowed


@pytest.mark.parametrize("vocab", [33, 257, 1000, 4099])
def test_masked_reference_equals_triton(vocab):
    logits, *args = mixed_case(vocab=vocab)
    allowed = random_allowed(16, vocab, seed=vocab)
    masked = torch.tensor([1, 0] * 8, dtype=torch.int32)
    masked[-1] = 1
    want = sample_ref(logits, *args, pack(allowed), masked)
    assert torch.equal(sample_triton(logits, *args, pack(allowed), masked), want)
    rows = masked.bool()
    assert allowed[rows.nonzero().squeeze(1), want[rows]].all()  # flagged rows picked allowed tokens
    assert want[-1].item() == vocab // 3  # the single allowed token, whatever the row's sampling parameters
    unflagged = sample_ref(logits, *args)[~rows]
    assert torch.equal(want[~rows], unflagged)  # unflagged rows: as if there were no mask


def test_masked_rows_never_pick_a_disallowed_token():
    """Many draws of a near-uniform distribution: every one is allowed; most allowed tokens do come up."""
    vocab, batch = 301, 64
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(5)) * 0.1
    allowed = torch.zeros(batch, vocab, dtype=torch.bool)
    allowed[:, 7:300:13] = True  # 23 tokens, none at the top of the vocabulary
    args = [torch.full((batch,), 1.0), torch.zeros(batch, dtype=torch.int32), torch.ones(batch),
            torch.arange(batch), torch.arange(batch) * 3]
    masked = torch.ones(batch, dtype=torch.int32)
    tokens = sample_ref(logits, *args, pack(allowed), masked)
    assert allowed[0, tokens].all()
    assert len(set(tokens.tolist())) > 12
    assert torch.equal(sample_triton(logits, *args, pack(allowed), masked), tokens)  # no filter: the ref's fast path


def test_narrow_bitmask_disallows_the_columns_past_it():
    """A bitmask of W words over logits wider than 32 * W (an embedding table padded past the tokenizer)."""
    vocab = 100
    logits = torch.zeros(3, vocab)
    logits[:, 90:] = 50.0  # the columns past 32 * 2 = 64 are the most likely ones
    allowed = torch.ones(3, vocab, dtype=torch.bool)
    masked = torch.ones(3, dtype=torch.int32)
    args = [torch.tensor([0.0, 1.0, 0.7]), torch.tensor([0, 0, 5], dtype=torch.int32), torch.tensor([1.0, 0.9, 1.0]),
            torch.arange(3), torch.zeros(3, dtype=torch.int64)]
    want = sample_ref(logits, *args, pack(allowed, words=2), masked)
    assert (want < 64).all()
    assert torch.equal(sample_triton(logits, *args, pack(allowed, words=2), masked), want)


def test_bad_mask_arguments_are_named():
    logits, *args = mixed_case(batch=4)
    with pytest.raises(ValueError, match="bitmask must be int32"):
        sample_triton(logits, *args, torch.zeros(4, 9, dtype=torch.int64), torch.ones(4))
    with pytest.raises(ValueError, match="masked must be"):
        sample_triton(logits, *args, torch.zeros(4, 9, dtype=torch.int32), None)


@GPU[0]
@GPU[1]
@pytest.mark.parametrize("vocab", [32000, 49152])
def test_gpu_masked_equals_cpu_reference(vocab):
    logits, *args = mixed_case(vocab=vocab)
    allowed = random_allowed(16, vocab, seed=1)
    masked = torch.tensor([1, 1, 0, 1] * 4, dtype=torch.int32)
    want = sample_ref(logits, *args, pack(allowed), masked)
    got = sample_triton(logits.cuda(), *(a.cuda() for a in args), pack(allowed).cuda(), masked.cuda())
    assert torch.equal(got.cpu(), want)

