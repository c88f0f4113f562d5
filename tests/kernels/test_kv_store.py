"""KV store: each token to its flat slot, -1 writes nothing, every other slot untouched."""
import pytest
import torch
from kernel_helpers import GPU, assert_close, rand

from hybrid_engine.kernels.kv_store import (decode_slots_ref, decode_slots_triton, prefill_slots_ref,
                                            prefill_slots_triton, store_kv_ref, store_kv_triton)

POISON = 123.0


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (3, 128), (8, 64)])
def test_store_kv(device_dtype, block_size, num_kv_heads, head_dim):
    device, dtype = device_dtype
    num_blocks, tokens = 5, 7
    k = rand(tokens, num_kv_heads, head_dim, dtype=dtype, device=device, seed=1)
    v = rand(tokens, num_kv_heads, head_dim, dtype=dtype, device=device, seed=2)
    slots = torch.tensor([3, block_size, -1, 4 * block_size + block_size - 1, 2, -1, 2 * block_size + 5],
                         device=device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, POISON, dtype=dtype, device=device)
    v_cache = torch.full(shape, POISON, dtype=dtype, device=device)
    want_k = torch.full(shape, POISON)
    want_v = torch.full(shape, POISON)
    store_kv_ref(k.float().cpu(), v.float().cpu(), want_k, want_v, slots.cpu())
    store_kv_triton(k, v, k_cache, v_cache, slots)
    assert_close(k_cache, want_k, dtype, "k_cache")
    assert_close(v_cache, want_v, dtype, "v_cache")
    written = (want_k != POISON).any(-1).any(-1).sum().item()
    assert written == 5  # two padding tokens wrote nothing


def test_store_kv_int32_slots_and_views():
    """slot_mapping may be int32, k/v may be views into a fused qkv output."""
    tokens, hkv, dim, bs = 4, 2, 64, 16
    qkv = torch.randn(tokens, (4 + 2 * hkv) * dim)
    k = qkv[:, 4 * dim:(4 + hkv) * dim].view(tokens, hkv, dim)
    v = qkv[:, (4 + hkv) * dim:].view(tokens, hkv, dim)
    slots = torch.tensor([0, 17, -1, 31], dtype=torch.int32)
    kc, vc = torch.zeros(2, bs, hkv, dim), torch.zeros(2, bs, hkv, dim)
    kc2, vc2 = kc.clone(), vc.clone()
    store_kv_ref(k, v, kc, vc, slots)
    store_kv_triton(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


# --- slot mapping on the device ---
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU)]


def _expected_slots(table: list[int], n: int, valid: int, block_size: int) -> list[int]:
    """Plain-Python spelling of the mapping, independent of both implementations."""
    return [table[p // block_size] * block_size + p % block_size if p < valid else -1 for p in range(n)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size,n,valid", [(16, 1, 1), (16, 37, 23), (16, 48, 48), (32, 7, 5), (8, 300, 291)])
def test_prefill_slots(device, block_size, n, valid):
    g = torch.Generator().manual_seed(n)
    max_blocks = -(-n // block_size) + 2
    table = torch.randperm(97, generator=g)[:max_blocks].to(torch.int32)
    table[-(-valid // block_size):] = 0  # unallocated tail entries, as staged
    want = _expected_slots(table.tolist(), n, valid, block_size)
    valid_len = torch.tensor([valid], dtype=torch.int32)
    ref = prefill_slots_ref(table, valid_len, block_size, torch.full((n,), -7, dtype=torch.int64))
    assert ref.tolist() == want
    out = torch.full((n + 3,), -7, dtype=torch.int64, device=device)  # a view of a longer buffer, as in the runner
    prefill_slots_triton(table.to(device), valid_len.to(device), block_size, out[:n])
    assert out[:n].tolist() == want
    assert out[n:].tolist() == [-7] * 3  # nothing past the step's length is written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,block_size", [(1, 16), (3, 16), (5, 32)])
def test_decode_slots(device, batch, block_size):
    g = torch.Generator().manual_seed(batch)
    max_blocks = 9
    tables = torch.randperm(200, generator=g)[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    positions = torch.randint(0, max_blocks * block_size, (batch,), generator=g)
    want = [tables[b, p // block_size].item() * block_size + p % block_size for b, p in enumerate(positions.tolist())]
    slots, seq_lens = torch.full((batch,), -7), torch.full((batch,), -7, dtype=torch.int32)
    decode_slots_ref(tables, positions, block_size, slots, seq_lens)
    assert slots.tolist() == want and seq_lens.tolist() == (positions + 1).tolist()
    slots2 = torch.full((batch,), -7, device=device)
    lens2 = torch.full((batch,), -7, dtype=torch.int32, device=device)
    decode_slots_triton(tables.to(device), positions.to(device), block_size, slots2, lens2)
    assert slots2.tolist() == want and lens2.tolist() == (positions + 1).tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,batch,block_size", [(4, 1, 16), (4, 3, 16), (6, 5, 8)])
def test_decode_slots_apply_the_steps_block_table_entries_first(device, rows, batch, block_size):
    """updates=(flat table, indices, blocks): the new entries are in the table before the slots are read from it,
    including a row's entry for the block its position has just entered; padding entries go to the spare row and
    change nothing else. Reference and kernel give the same table and slots."""
    max_blocks = 5
    table = torch.arange((rows + 1) * max_blocks, dtype=torch.int32).view(rows + 1, max_blocks) + 100
    positions = torch.tensor([block_size * (1 + b % 3) for b in range(batch)])  # first token of a new block
    spare = rows * max_blocks
    index = torch.full((rows,), spare, dtype=torch.int64)
    new = torch.full((rows,), 7, dtype=torch.int32)
    for b in range(batch):
        index[b], new[b] = b * max_blocks + int(positions[b]) // block_size, 500 + b
    want = [(500 + b) * block_size for b in range(batch)]
    results = []
    for fn, dev in ((decode_slots_ref, "cpu"), (decode_slots_triton, device)):
        t = table.clone().to(dev)
        slots = torch.full((batch,), -7, device=dev)
        lens = torch.full((batch,), -7, dtype=torch.int32, device=dev)
        fn(t[:batch], positions.to(dev), block_size, slots, lens, (t.view(-1), index.to(dev), new.to(dev)))
        assert slots.tolist() == want, fn.__name__
        results.append(t.cpu())
    assert torch.equal(results[0][:rows], results[1][:rows])
    untouched = torch.ones(rows, max_blocks, dtype=torch.bool)
    for b in range(batch):
        untouched[b, int(positions[b]) // block_size] = False
    assert torch.equal(results[1][:rows][untouched], table[:rows][untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size,start,n,valid", [(16, 16, 20, 20), (16, 37, 11, 9), (8, 5, 30, 30)])
def test_prefill_slots_of_a_chunk_after_cached_positions(device, block_size, start, n, valid):
    g = torch.Generator().manual_seed(start)
    max_blocks = -(-(start + n) // block_size) + 1
    table = torch.randperm(97, generator=g)[:max_blocks].to(torch.int32)
    want = [int(table[p // block_size]) * block_size + p % block_size if p - start < valid else -1
            for p in range(start, start + n)]
    valid_len = torch.tensor([valid], dtype=torch.int32)
    ref = prefill_slots_ref(table, valid_len, block_size, torch.full((n,), -7, dtype=torch.int64), start)
    assert ref.tolist() == want
    out = torch.full((n,), -7, dtype=torch.int64, device=device)
    prefill_slots_triton(table.to(device), valid_len.to(device), block_size, out, start)
    assert out.tolist() == want
    start_t = torch.tensor([start], dtype=torch.int32)  # from a device buffer (a graph serves any start)
    ref = prefill_slots_ref(table, valid_len, block_size, torch.full((n,), -7, dtype=torch.int64), start_t)
    assert ref.tolist() == want
    out = torch.full((n,), -7, dtype=torch.int64, device=device)
    prefill_slots_triton(table.to(device), valid_len.to(device), block_size, out, start_t.to(device))
    assert out.tolist() == want
