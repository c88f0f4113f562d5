"""Decode GEMM (M = 1..33 rows, BLOCK_M fixed at 16) vs the fp32 references, and batch invariance: a row's result is
bitwise the same whatever the other rows are and however many there are, for every epilogue, with split-K and in
both dot layouts (SWAP=0: rows as the MMA's M operand; SWAP=1: weight rows)."""
import pytest
import torch
from kernel_helpers import GPU, assert_close, assert_replays_like_ref, rand

from hybrid_engine.kernels import decode_gemm as dg
from hybrid_engine.kernels import _workspace, gemv
from hybrid_engine.kernels.activation import silu_mul_ref
from hybrid_engine.kernels.decode_gemm import (decode_gemm_triton, decode_rope_store_triton, decode_silu_triton,
                                               linear_ref, linear_rope_store_ref, linear_silu_mul_ref)
from hybrid_engine.kernels.rope import rope_ref

# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages[, SWAP]): small tiles so odd sizes span several tiles on the
# CPU. The 5-tuples are SWAP=0; SWAP_CONFIGS are the same tiles with the weight as the dot's M operand.
CONFIGS = [(16, 32, 1, 1, 1), (16, 32, 3, 1, 1), (32, 64, 2, 1, 1)]
SWAP_CONFIGS = [(*c, 1) for c in CONFIGS]
BOTH = [pytest.param(c, id=str(c)) for c in CONFIGS + SWAP_CONFIGS]
ROPE_CONFIGS = CONFIGS[:2] + [(16, 64, 2, 1, 1)]  # BLOCK_N 16: the rotary half of head_dim 32
# fp32 everywhere; fp16 also under the interpreter (its numpy dot has no bf16: bf16 only on the GPU)
DEVICE_DTYPES = [pytest.param(("cpu", torch.float32), id="cpu-fp32"),
                 pytest.param(("cpu", torch.float16), id="cpu-fp16", marks=pytest.mark.skipif(
                     torch.cuda.is_available(), reason="the interpreter's fp16 run")),
                 pytest.param(("cuda", torch.float16), id="cuda-fp16", marks=GPU),
                 pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=GPU)]
SUBSET_SIZES = (2, 3, 16, 17)


@pytest.fixture(params=DEVICE_DTYPES)
def dev_dtype(request):
    return request.param


def _subsets(rows: int, seed: int = 0):
    """Row subsets of each size in SUBSET_SIZES, in random order (the kernel must not care where a row sits)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(rows, generator=gen)[:size] for size in SUBSET_SIZES]


def _assert_row_invariant(fn, x, what):
    """fn(x) row by row equals fn(x[[i]]) for every row and fn(x[subset]) for the subsets: bitwise."""
    full = fn(x)
    for i in range(x.shape[0]):
        assert torch.equal(fn(x[i:i + 1]), full[i:i + 1]), f"{what}: row {i} alone differs"
    for idx in _subsets(x.shape[0]):
        assert torch.equal(fn(x[idx]), full[idx]), f"{what}: the {len(idx)}-row subset differs"


@pytest.mark.parametrize("config", BOTH)
@pytest.mark.parametrize("m", [1, 5, 17, 33])
@pytest.mark.parametrize("n,k,with_bias", [(48, 40, True), (80, 200, False), (40, 96, True)])
def test_decode_gemm(dev_dtype, config, m, n, k, with_bias):
    device, dtype = dev_dtype
    x = rand(m, k, dtype=dtype, device=device, seed=1)
    w = rand(n, k, dtype=dtype, device=device, seed=2, scale=0.2)
    b = rand(n, dtype=dtype, device=device, seed=3) if with_bias else None
    out = decode_gemm_triton(x, w, b, config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, linear_ref(x.float(), w.float(), None if b is None else b.float()), dtype, "decode gemm")


@pytest.mark.parametrize("config", BOTH)
@pytest.mark.parametrize("m,i,k", [(1, 24, 40), (17, 40, 200), (33, 16, 96)])
def test_decode_silu_mul(dev_dtype, config, m, i, k):
    """Gate/up with SiLU-mul in the epilogue: the reference, and the composed decode GEMM + SiLU-mul (each half
    rounded like the unfused output) up to fp32 rounding of the SiLU."""
    device, dtype = dev_dtype
    x = rand(m, k, dtype=dtype, device=device, seed=4)
    w = rand(2 * i, k, dtype=dtype, device=device, seed=5, scale=0.3)
    out = decode_silu_triton(x, w, config)
    assert out.shape == (m, i) and out.dtype == dtype
    assert_close(out, linear_silu_mul_ref(x.float(), w.float()), dtype, "silu epilogue")
    composed = silu_mul_ref(decode_gemm_triton(x, w, None, config).float()).to(dtype)
    torch.testing.assert_close(out, composed, rtol=1e-5, atol=1e-6)


def _rope_case(device, dtype, m, hq, hkv, d, k, bias, seed=0):
    """Inputs of M decode rows' QKV + rope + KV store, every row its own position and slot (row 1: slot -1), and
    NaN-filled caches [6 blocks, 8 slots, Hkv, D]."""
    n = (hq + 2 * hkv) * d
    x = rand(m, k, dtype=dtype, device=device, seed=seed + 1)
    w = rand(n, k, dtype=dtype, device=device, seed=seed + 2, scale=0.2)
    b = rand(n, dtype=dtype, device=device, seed=seed + 3) if bias else None
    freqs = torch.outer(torch.arange(64, dtype=torch.float), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 64, (m,), generator=gen).to(device)
    slots = torch.randperm(48, generator=gen)[:m].to(device)
    if m > 1:
        slots[1] = -1
    caches = [torch.full((6, 8, hkv, d), float("nan"), dtype=dtype, device=device) for _ in range(2)]
    return (x, w, b, pos, cos_sin), caches, slots


@pytest.mark.parametrize("config", ROPE_CONFIGS + [(*c, 1) for c in ROPE_CONFIGS], ids=str)
@pytest.mark.parametrize("m,hq,hkv,d,k,bias", [(1, 2, 1, 32, 40, False), (5, 3, 3, 32, 96, True),
                                               (17, 4, 2, 64, 72, True)])
def test_decode_rope_store(dev_dtype, config, m, hq, hkv, d, k, bias):
    """QKV with rope and the KV-cache writes in the epilogue (GQA, odd K, bias, per-row positions and slots): q and
    every cache element against the reference; slot -1 and the slots of no row stay unwritten."""
    device, dtype = dev_dtype
    (x, w, b, pos, cos_sin), (kc, vc), slots = _rope_case(device, dtype, m, hq, hkv, d, k, bias)
    q = decode_rope_store_triton(x, w, b, pos, cos_sin, kc, vc, slots, hq, hkv, config)
    kr, vr = torch.full_like(kc, float("nan")).float(), torch.full_like(vc, float("nan")).float()
    qr = linear_rope_store_ref(x.float(), w.float(), None if b is None else b.float(), pos, cos_sin, kr, vr,
                               slots, hq, hkv)
    assert q.shape == (m, hq, d) and q.dtype == dtype
    assert_close(q, qr, dtype, "q")
    written = torch.zeros(48, dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    for got, want in ((kc, kr), (vc, vr)):
        got, want = got.view(48, hkv, d), want.view(48, hkv, d)
        assert_close(got[written], want[written], dtype, "cache slots")
        assert got[~written].isnan().all()  # nothing else written (slot -1 included)


@pytest.mark.parametrize("config", [CONFIGS[1], SWAP_CONFIGS[1]], ids=str)
def test_rope_store_equals_composed_ops(config):
    """The fused epilogue rounds like the unfused ops: decode GEMM, then rope_ref on the rounded q and k."""
    (x, w, b, pos, cos_sin), (kc, vc), slots = _rope_case("cpu", torch.float16, 5, 2, 1, 32, 40, True, seed=3)
    q = decode_rope_store_triton(x, w, b, pos, cos_sin, kc, vc, slots, 2, 1, config)
    qkv = decode_gemm_triton(x, w, b, config).view(5, 4, 32)
    qc, kc2 = rope_ref(qkv[:, :2].clone(), qkv[:, 2:3].clone(), pos, cos_sin)
    torch.testing.assert_close(q, qc, rtol=0, atol=1e-3)  # one fp16 ulp where the fp32 sums differ in order
    kept = slots >= 0
    torch.testing.assert_close(kc.view(48, 1, 32)[slots[kept]], kc2[kept], rtol=0, atol=1e-3)


@pytest.mark.parametrize("config", CONFIGS[:2] + SWAP_CONFIGS[:2], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_invariance_plain_and_silu(config, dtype):
    """33 rows: each row alone, and subsets of 2, 3, 16 and 17 rows, give bitwise the rows of the 33-row call (and
    so of each other), with and without split-K."""
    x = rand(33, 200, dtype=dtype, device="cpu", seed=8)
    w = rand(80, 200, dtype=dtype, device="cpu", seed=9, scale=0.2)
    b = rand(80, dtype=dtype, device="cpu", seed=10)
    _assert_row_invariant(lambda rows: decode_gemm_triton(rows, w, b, config), x, "plain")
    _assert_row_invariant(lambda rows: decode_silu_triton(rows, w, config), x, "silu_mul")


@pytest.mark.parametrize("config", CONFIGS[:2] + SWAP_CONFIGS[:2], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_invariance_rope_store(config, dtype):
    """The same for q and for what each row writes to the caches."""
    (x, w, b, pos, cos_sin), _, slots = _rope_case("cpu", dtype, 33, 2, 1, 32, 200, True, seed=5)

    def run(idx):
        kc, vc = (torch.full((6, 8, 1, 32), float("nan"), dtype=dtype) for _ in range(2))
        q = decode_rope_store_triton(x[idx], w, b, pos[idx], cos_sin, kc, vc, slots[idx], 2, 1, config)
        kept = slots[idx] >= 0
        return q, kc.view(48, 32)[slots[idx][kept]], vc.view(48, 32)[slots[idx][kept]], kc, vc

    full_q, full_k, full_v, _, _ = run(torch.arange(33))
    at = {int(s): j for j, s in enumerate(slots[slots >= 0])}  # slot -> its row in full_k / full_v
    for idx in [torch.tensor([i]) for i in range(33)] + _subsets(33, seed=1):
        q, k, v, kc, vc = run(idx)
        assert torch.equal(q, full_q[idx])
        rows = [at[int(s)] for s in slots[idx] if s >= 0]
        assert torch.equal(k, full_k[rows]) and torch.equal(v, full_v[rows])
        assert kc.isnan().sum() == (48 - len(rows)) * 32  # slot -1 rows write nothing


def _split_counters(n_tiles: int, split: int, pair: bool, block_n: int) -> torch.Tensor:
    return _workspace._SPLIT_BUFFERS[("cpu", 0, False, "decode_gemm", n_tiles, split, pair, block_n)][1]


def test_split_k_counters_reset_and_repeatable():
    """After a split-K call every arrival counter is back at zero, so the next call (or graph replay) gives the
    same output without a memset; a larger M than DECODE_MAX_ROWS grows the workspace once."""
    config = (16, 32, 3, 1, 1)
    x = rand(33, 200, dtype=torch.float32, device="cpu", seed=11)
    w = rand(48, 200, dtype=torch.float32, device="cpu", seed=12, scale=0.2)
    first = decode_gemm_triton(x, w, None, config)
    counters = _split_counters(3, 3, False, 16)
    assert counters.numel() >= 3 * 3 and not counters.any()
    assert torch.equal(decode_gemm_triton(x, w, None, config), first)
    silu = decode_silu_triton(x, w, config)
    assert not _split_counters(2, 3, True, 16).any()
    assert torch.equal(decode_silu_triton(x, w, config), silu)


def test_workspace_grows_once_past_max_rows(monkeypatch):
    monkeypatch.setattr(dg, "DECODE_MAX_ROWS", 16)
    config = (16, 32, 2, 1, 1)
    w = rand(16, 40, dtype=torch.float32, device="cpu", seed=13)
    x = rand(40, 40, dtype=torch.float32, device="cpu", seed=14)
    small = decode_gemm_triton(x[:16], w, None, config)
    assert _split_counters(1, 2, False, 16).numel() == 1
    big = decode_gemm_triton(x, w, None, config)  # 3 M-tiles: grows
    assert _split_counters(1, 2, False, 16).numel() == 3
    assert torch.equal(big[:16], small)
    assert_close(big, linear_ref(x, w), torch.float32, "grown workspace")


def test_default_config_from_shape_only():
    """Valid for every LLaMA-2-7B shape, enough programs at M <= 16 (or the split cap), and a table entry wins."""
    for n, k in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096), (48, 40)]:
        block_n, block_k, split, _, _, _ = dg._check_config(dg.default_config(n, k))
        assert -(-n // block_n) * split >= 4 * dg.H200_SMS or split == min(8, -(-k // (2 * block_k)))
    assert dg.config_for(48, 40) == dg.default_config(48, 40)


def test_default_config_follows_the_cards_sm_count():
    """An untuned card splits K for ~4 programs per SM of its own: fewer SMs, no more splits; never the row count."""
    for n, k in [(4096, 4096), (4096, 11008), (2048, 8192)]:
        small, h200, big = (dg.default_config(n, k, sms)[2] for sms in (46, dg.H200_SMS, 170))
        assert small <= h200 <= big
        tiles = -(-n // dg.default_config(n, k, 46)[0])
        assert tiles * small >= 4 * 46 or small == min(8, -(-k // (2 * dg.default_config(n, k, 46)[1])))
    assert dg.default_config(4096, 4096, 46)[2] < dg.default_config(4096, 4096, dg.H200_SMS)[2]


def test_config_errors(monkeypatch):
    x, w = torch.randn(2, 40), torch.randn(48, 40)
    with pytest.raises(ValueError, match="BLOCK_N=8"):
        decode_gemm_triton(x, w, None, (8, 32, 1, 1, 1))
    with pytest.raises(ValueError, match="SPLIT_K"):
        decode_gemm_triton(x, w, None, (16, 32, 0, 1, 1))
    with pytest.raises(ValueError, match="K=40"):
        decode_gemm_triton(torch.randn(2, 39), w, None, CONFIGS[0])
    with pytest.raises(ValueError, match="even"):
        decode_silu_triton(x, w[:47], CONFIGS[0])
    with pytest.raises(ValueError, match=r"SWAP=2 must be 0 .* or 1"):
        decode_gemm_triton(x, w, None, (16, 32, 1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"SWAP='1'"):
        decode_gemm_triton(x, w, None, (16, 32, 1, 1, 1, "1"))
    for bad in ((16, 32, 1, 1), (16, 32, 1, 1, 1, 0, 0)):
        with pytest.raises(ValueError, match=r"num_stages\[, SWAP\]\)"):
            decode_gemm_triton(x, w, None, bad)
    try:
        for entry, want in (((16, 32, 1, 1, 1), (16, 32, 1, 1, 1, 0)), ((32, 64, 2, 4, 3, 1), (32, 64, 2, 4, 3, 1))):
            monkeypatch.setitem(dg.DECODE_GEMM_CONFIGS, (48, 40), entry)
            dg._config.cache_clear()  # config_for memoizes per shape, device and dtype
            assert dg.config_for(48, 40) == want
    finally:
        dg._config.cache_clear()


def test_swap_reaches_the_kernel_and_a_5_tuple_means_swap_0(monkeypatch):
    """The outputs cannot tell the layouts apart (both are right), so the layout run is read off the launch."""
    real, swaps = dg.launch, []

    def spy(fn, grid, *args, **kw):
        swaps.append(kw["SWAP"])
        return real(fn, grid, *args, **kw)

    monkeypatch.setattr(dg, "launch", spy)
    x = rand(3, 40, dtype=torch.float32, device="cpu", seed=15)
    w = rand(48, 40, dtype=torch.float32, device="cpu", seed=16, scale=0.2)
    for config in (CONFIGS[0], (*CONFIGS[0], 0), SWAP_CONFIGS[0], (*CONFIGS[0], True)):
        assert_close(decode_gemm_triton(x, w, None, config), linear_ref(x, w), torch.float32, str(config))
    assert swaps == [0, 0, 1, 1]
    assert dg._check_config(CONFIGS[0]) == (*CONFIGS[0], 0)


def test_rope_store_refuses_a_block_n_past_the_rotary_half(monkeypatch):
    """head_dim 32 has a rotary half of 16 columns: a BLOCK_N 32 config (here a swap one) cannot hold a head's
    column pairs, so the kernel raises and the dispatch returns None with the caches untouched (the caller composes
    the unfused ops); a BLOCK_N 16 swap config serves it."""
    (x, w, b, pos, cos_sin), (kc, vc), slots = _rope_case("cpu", torch.float32, 3, 2, 1, 32, 40, True)
    with pytest.raises(ValueError, match="rotary half divisible by BLOCK_N=32"):
        decode_rope_store_triton(x, w, b, pos, cos_sin, kc, vc, slots, 2, 1, (32, 32, 1, 1, 1, 1))
    monkeypatch.setattr(dg, "_kernel_ok", lambda *args: True)  # the CUDA dispatch, run by the interpreter
    args = (x, w, b, pos, cos_sin, kc, vc, slots, 2, 1)
    try:
        monkeypatch.setitem(dg.DECODE_GEMM_CONFIGS, (128, 40), (32, 32, 1, 1, 1, 1))
        dg._config.cache_clear()
        assert dg.decode_linear_rope_store(*args) is None and kc.isnan().all() and vc.isnan().all()
        monkeypatch.setitem(dg.DECODE_GEMM_CONFIGS, (128, 40), (16, 32, 1, 1, 1, 1))
        dg._config.cache_clear()
        q = dg.decode_linear_rope_store(*args)
    finally:
        dg._config.cache_clear()
    kr, vr = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    assert_close(q, linear_rope_store_ref(x, w, b, pos, cos_sin, kr, vr, slots, 2, 1), torch.float32, "q")
    kept = slots[slots >= 0]
    assert_close(kc.view(48, 32)[kept], kr.view(48, 32)[kept], torch.float32, "k slots")


def test_dispatch_off_cuda_is_row_by_row():
    """On the CPU (no interpreter dispatch) decode_linear is F.linear one row at a time (bitwise the single-row
    result) and the fused ops return None, for the caller to compose."""
    x, w, b = torch.randn(17, 40), torch.randn(48, 40), torch.randn(48)
    out = dg.decode_linear(x, w, b)
    assert all(torch.equal(out[i:i + 1], torch.nn.functional.linear(x[i:i + 1], w, b)) for i in range(17))
    assert dg.decode_linear_silu_mul(x, w) is None
    (x, w, b, pos, cos_sin), (kc, vc), slots = _rope_case("cpu", torch.float32, 3, 2, 1, 32, 40, False)
    assert dg.decode_linear_rope_store(x, w, b, pos, cos_sin, kc, vc, slots, 2, 1) is None


# --- GPU: the LLaMA-2-7B shapes with their configs, invariance over the decode buckets, graph replay -------------

@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_linear_gpu_buckets(n, k, dtype):
    x = torch.randn(32, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
    full = dg.decode_linear(x, w)
    assert_close(full, linear_ref(x, w).float(), dtype, "decode_linear")
    for m in (1, 2, 4, 8, 16):
        assert torch.equal(dg.decode_linear(x[-m:], w), full[-m:]), m
    if n == 22016:
        act = dg.decode_linear_silu_mul(x, w)
        assert_close(act, linear_silu_mul_ref(x, w).float(), dtype, "silu_mul")
        assert torch.equal(dg.decode_linear_silu_mul(x[:1], w), act[:1])
    assert_replays_like_ref(lambda: dg.decode_linear(x, w), x, lambda: linear_ref(x, w).float(), dtype, "graph")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [(64, 128, 1, 4, 3, 1), (128, 64, 4, 4, 2, 1), (64, 256, 2, 8, 2, 1)], ids=str)
def test_swap_configs_gpu(config):
    """wgmma-sized swap tiles (the weight as the M operand): the O and gate/up shapes of LLaMA-2-7B right and every
    decode bucket's rows bitwise those of the 32-row call; rope + KV store where BLOCK_N divides the rotary half (64),
    else refused."""
    dtype = torch.float16
    x = torch.randn(32, 4096, device="cuda", dtype=dtype)
    for n in (4096, 22016):
        w = torch.randn(n, 4096, device="cuda", dtype=dtype) * 0.02
        full = decode_gemm_triton(x, w, None, config)
        assert_close(full, linear_ref(x, w).float(), dtype, f"plain {n}")
        act = decode_silu_triton(x, w, config)
        assert_close(act, linear_silu_mul_ref(x, w).float(), dtype, f"silu_mul {n}")
        for m in (1, 2, 4, 8, 16):
            assert torch.equal(decode_gemm_triton(x[-m:], w, None, config), full[-m:]), (n, m)
            assert torch.equal(decode_silu_triton(x[-m:], w, config), act[-m:]), (n, m)
    (x, w, b, pos, cos_sin), (kc, vc), slots = _rope_case("cuda", dtype, 8, 32, 32, 128, 4096, False)
    w.mul_(0.1)
    if config[0] > 64:
        with pytest.raises(ValueError, match=f"BLOCK_N={config[0]}"):
            decode_rope_store_triton(x, w, None, pos, cos_sin, kc, vc, slots, 32, 32, config)
        return
    q = decode_rope_store_triton(x, w, None, pos, cos_sin, kc, vc, slots, 32, 32, config)
    kr, vr = torch.full_like(kc, float("nan")).float(), torch.full_like(vc, float("nan")).float()
    assert_close(q, linear_rope_store_ref(x.float(), w.float(), None, pos, cos_sin, kr, vr, slots, 32, 32), dtype, "q")
    q0 = decode_rope_store_triton(x[:1], w, None, pos[:1], cos_sin, kc, vc, slots[:1], 32, 32, config)
    assert torch.equal(q0, q[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_linear_rope_store_gpu(dtype):
    """32 heads of 128 (LLaMA-2-7B): q and the cache slots against the reference, row 0 alone equal to the batch."""
    (x, w, b, pos, cos_sin), (kc, vc), slots = _rope_case("cuda", dtype, 8, 32, 32, 128, 4096, False)
    w.mul_(0.1)
    q = dg.decode_linear_rope_store(x, w, None, pos, cos_sin, kc, vc, slots, 32, 32)
    kr, vr = torch.full_like(kc, float("nan")).float(), torch.full_like(vc, float("nan")).float()
    qr = linear_rope_store_ref(x.float(), w.float(), None, pos, cos_sin, kr, vr, slots, 32, 32)
    assert_close(q, qr, dtype, "q")
    kept = slots >= 0
    assert_close(kc.view(48, 32, 128)[slots[kept]], kr.view(48, 32, 128)[slots[kept]], dtype, "k slots")
    q0 = dg.decode_linear_rope_store(x[:1], w, None, pos[:1], cos_sin, kc, vc, slots[:1], 32, 32)
    assert torch.equal(q0, q[:1])


# --- The RMSNorm folded in --------------------------------------------------------------------------------------------

ONE_SPLIT = [pytest.param(c, id=str(c)) for c in (CONFIGS[0], SWAP_CONFIGS[0], (16, 64, 1, 1, 1))]


def _norm_rows(m, k, dtype, seed):
    """(residual [m, k], norm weight [k], eps) of an RMSNorm folded into the decode GEMM."""
    return (rand(m, k, dtype=dtype, device="cpu", seed=seed),
            1 + rand(k, dtype=dtype, device="cpu", seed=seed + 1, scale=0.3), 1e-5)


@pytest.mark.parametrize("config", ONE_SPLIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,i,k", [(1, 24, 100), (5, 40, 64), (17, 24, 130)])
def test_silu_with_the_norm_folded_in(config, dtype, m, i, k):
    """norm=(residual, g, eps): silu_mul(rmsnorm(x + residual) @ W^T) against the norm reference then the fused
    reference (up to the norm's rounding, which the fold skips); x + residual comes back exactly as the unfused add
    gives it."""
    from hybrid_engine.kernels.rms_norm import rms_norm_ref

    x = rand(m, k, dtype=dtype, device="cpu", seed=40)
    w = rand(2 * i, k, dtype=dtype, device="cpu", seed=41, scale=0.3)
    residual, g, eps = _norm_rows(m, k, dtype, seed=42)
    out, new_residual = decode_silu_triton(x, w, config, norm=(residual, g, eps))
    normed, _ = rms_norm_ref(x.float(), g.float(), eps, residual.float())
    assert torch.equal(new_residual, x + residual)
    assert out.shape == (m, i) and out.dtype == dtype
    assert_close(out, linear_silu_mul_ref(normed, w.float()), dtype, "norm + decode silu")


@pytest.mark.parametrize("config", [CONFIGS[0], SWAP_CONFIGS[0]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_store_with_the_norm_folded_in(config, dtype):
    from hybrid_engine.kernels.rms_norm import rms_norm_ref

    (x, w, b, pos, cos_sin), (kc, vc), slots = _rope_case("cpu", dtype, 5, 3, 1, 32, 72, True, seed=11)
    residual, g, eps = _norm_rows(5, 72, dtype, seed=50)
    q, new_residual = decode_rope_store_triton(x, w, b, pos, cos_sin, kc, vc, slots, 3, 1, config,
                                               norm=(residual, g, eps))
    normed, _ = rms_norm_ref(x.float(), g.float(), eps, residual.float())
    kr, vr = torch.full_like(kc, float("nan")).float(), torch.full_like(vc, float("nan")).float()
    qr = linear_rope_store_ref(normed, w.float(), b.float(), pos, cos_sin, kr, vr, slots, 3, 1)
    assert torch.equal(new_residual, x + residual)
    assert_close(q, qr, dtype, "norm + q")
    written = slots[slots >= 0]
    for got, want in ((kc, kr), (vc, vr)):
        assert_close(got.view(48, 1, 32)[written], want.view(48, 1, 32)[written], dtype, "norm + cache slots")


@pytest.mark.parametrize("config", [CONFIGS[0], SWAP_CONFIGS[0]], ids=str)
def test_batch_invariance_with_the_norm_folded_in(config):
    """Each row alone and in subsets gives bitwise its row of the 33-row call, the gate/up output and the residual."""
    x = rand(33, 72, dtype=torch.float16, device="cpu", seed=60)
    w = rand(48, 72, dtype=torch.float16, device="cpu", seed=61, scale=0.2)
    residual, g, eps = _norm_rows(33, 72, torch.float16, seed=62)

    def run(idx):
        out, res = decode_silu_triton(x[idx], w, config, norm=(residual[idx], g, eps))
        return torch.cat([out, res], dim=1)

    _assert_row_invariant(lambda rows: run(rows), torch.arange(33), "norm + silu_mul")


def test_a_folded_norm_needs_one_split_and_matching_rows():
    x = rand(3, 64, dtype=torch.float32, device="cpu", seed=70)
    w = rand(32, 64, dtype=torch.float32, device="cpu", seed=71)
    residual, g, eps = _norm_rows(3, 64, torch.float32, seed=72)
    with pytest.raises(ValueError, match=r"folded RMSNorm needs all of K in one program: config \(16, 32, 2"):
        decode_silu_triton(x, w, (16, 32, 2, 1, 1), norm=(residual, g, eps))
    with pytest.raises(ValueError, match="a folded norm needs contiguous rows and residual of one shape"):
        decode_silu_triton(x, w, CONFIGS[0], norm=(residual[:2], g, eps))


def test_the_fold_is_off_unless_asked_and_then_needs_one_split(monkeypatch, request):
    """decode_norm_linear_* return None (the caller composes) with $HYBRID_ENGINE_DECODE_GEMM_NORM unset, on the CPU
    (no kernel there) and where the shape's config splits K; a bad value names the allowed ones."""
    x = rand(2, 64, dtype=torch.float16, device="cpu", seed=80)
    w = rand(32, 64, dtype=torch.float16, device="cpu", seed=81)
    residual, g, eps = _norm_rows(2, 64, torch.float16, seed=82)
    request.addfinalizer(dg.fold_norm_mode.cache_clear)  # later readers see the environment restored
    monkeypatch.delenv("HYBRID_ENGINE_DECODE_GEMM_NORM", raising=False)
    dg.fold_norm_mode.cache_clear()
    assert dg.fold_norm_mode() is False
    monkeypatch.setattr(dg, "_kernel_ok", lambda *a: True)  # as on a GPU
    monkeypatch.setattr(dg, "config_for", lambda *a: (16, 32, 1, 1, 1, 0))
    assert dg.decode_norm_linear_silu_mul(x, residual, g, eps, w) is None
    monkeypatch.setenv("HYBRID_ENGINE_DECODE_GEMM_NORM", "1")
    dg.fold_norm_mode.cache_clear()
    out, new_residual = dg.decode_norm_linear_silu_mul(x, residual, g, eps, w)
    assert out.shape == (2, 16) and torch.equal(new_residual, x + residual)
    assert dg.decode_norm_linear_silu_mul(x, None, g, eps, w) is None  # the first layer: no residual yet
    monkeypatch.setattr(dg, "config_for", lambda *a: (16, 32, 2, 1, 1, 0))
    assert dg.decode_norm_linear_silu_mul(x, residual, g, eps, w) is None
    monkeypatch.setenv("HYBRID_ENGINE_DECODE_GEMM_NORM", "maybe")
    dg.fold_norm_mode.cache_clear()
    with pytest.raises(ValueError, match=r"HYBRID_ENGINE_DECODE_GEMM_NORM='maybe' must be 0 \(the norm"):
        dg.fold_norm_mode()


@pytest.mark.parametrize("config", [(32, 128, 1, 4, 4, 0), (64, 128, 1, 4, 4, 1)], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_norm_folded_in_gpu(config):
    """On the card, both layouts at the small models' tile sizes: the fold against the references, and each of 32
    rows alone bitwise equal to its row of the 32-row call (gate/up output and residual)."""
    from hybrid_engine.kernels.rms_norm import rms_norm_ref

    k, i = 576, 1536
    x = rand(32, k, dtype=torch.float16, device="cuda", seed=90)
    w = rand(2 * i, k, dtype=torch.float16, device="cuda", seed=91, scale=0.05)
    residual = rand(32, k, dtype=torch.float16, device="cuda", seed=92)
    g = 1 + rand(k, dtype=torch.float16, device="cuda", seed=93, scale=0.3)
    out, new_residual = decode_silu_triton(x, w, config, norm=(residual, g, 1e-5))
    normed, _ = rms_norm_ref(x.float(), g.float(), 1e-5, residual.float())
    assert torch.equal(new_residual, x + residual)
    assert_close(out, linear_silu_mul_ref(normed, w.float()), torch.float16, "norm + decode silu on the card")
    for r in (0, 13, 31):
        one, one_res = decode_silu_triton(x[r:r + 1], w, config, norm=(residual[r:r + 1], g, 1e-5))
        assert torch.equal(one, out[r:r + 1]) and torch.equal(one_res, new_residual[r:r + 1])


# --- One 32-row tile above 16 rows ----------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [CONFIGS[1], SWAP_CONFIGS[1], (16, 64, 1, 1, 1)], ids=str)
def test_wide_tiles_keep_the_products_and_the_split_k_workspace(monkeypatch, request, config):
    """$HYBRID_ENGINE_DECODE_GEMM_WIDE=1: 17-33 rows run in 32-row tiles (the grid has one M-tile per 32 rows) and
    still equal the references, every epilogue, with and without split-K; 1-16 rows keep their 16-row tiles."""
    from hybrid_engine.kernels import _triton

    request.addfinalizer(dg.wide_rows_mode.cache_clear)  # later readers see the environment restored
    monkeypatch.setenv("HYBRID_ENGINE_DECODE_GEMM_WIDE", "1")
    dg.wide_rows_mode.cache_clear()
    tiles = []
    launch = _triton.launch
    monkeypatch.setattr(dg, "launch", lambda fn, grid, *a, **kw: tiles.append((grid, kw["BLOCK_M"])) or launch(
        fn, grid, *a, **kw))
    x = rand(33, 72, dtype=torch.float32, device="cpu", seed=95)
    w = rand(48, 72, dtype=torch.float32, device="cpu", seed=96, scale=0.2)
    for m in (33, 17, 16, 1):
        assert_close(decode_gemm_triton(x[:m], w, None, config), linear_ref(x[:m], w).float(), torch.float32,
                     f"wide plain {m}")
        assert_close(decode_silu_triton(x[:m], w, config), linear_silu_mul_ref(x[:m], w).float(), torch.float32,
                     f"wide silu {m}")
    plain, silu = -(-48 // config[0]), -(-24 // config[0])  # N-tiles of the plain and the SiLU launches
    m_tiles = [(grid[0] // (silu if i % 2 else plain), block_m) for i, (grid, block_m) in enumerate(tiles)]
    assert m_tiles == [(2, 32)] * 2 + [(1, 32)] * 2 + [(1, 16)] * 4  # 33, 17, 16 and 1 rows, plain then SiLU
    (xr, wr, b, pos, cos_sin), (kc, vc), slots = _rope_case("cpu", torch.float32, 20, 2, 1, 32, 72, True, seed=12)
    q = decode_rope_store_triton(xr, wr, b, pos, cos_sin, kc, vc, slots, 2, 1, ROPE_CONFIGS[0])
    kr, vr = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    assert_close(q, linear_rope_store_ref(xr, wr, b, pos, cos_sin, kr, vr, slots, 2, 1), torch.float32, "wide rope")
