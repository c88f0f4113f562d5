"""Read a safetensors checkpoint straight into device memory: parallel file reads into pinned host chunks, copied to
the card on a side stream while the next chunks are read.

The safetensors library hands out one CPU tensor at a time (a page-faulting copy out of its memory map), which the
loader then copied to the card from pageable memory: one thread, no overlap of disk, host copy and H2D. Here a tensor's
bytes are read with `os.preadv` (which releases the GIL, so reads run in parallel and beside Python work on other
threads) into a ring of pinned chunks, and each chunk goes to the card asynchronously as soon as it is read. On the CPU
the chunks are read in parallel directly into the tensor.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets relative to the data after the header), the data.
"""
from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CHUNK_BYTES = 32 << 20  # one read and one H2D copy
CHUNKS = 8  # pinned chunks in flight
READERS = 4  # threads reading


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


def read_header(path: str) -> list[Entry]:
    """The tensors of a safetensors file in file order; ValueError naming what is malformed."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes: shorter than the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise ValueError(f"header length {length} exceeds the file's {size} bytes")
        header = json.loads(f.read(length))
    base, entries = 8 + length, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {meta.get('dtype')!r}; readable: {sorted(DTYPES)}")
        shape, (begin, end) = tuple(meta["shape"]), meta["data_offsets"]
        count = 1
        for dim in shape:
            count *= dim
        if end - begin != count * dtype.itemsize or begin < 0 or base + end > size:
            raise ValueError(f"tensor {name!r}: data_offsets {[begin, end]} do not hold {shape} {meta['dtype']} "
                             f"within the file's {size} bytes")
        entries.append(Entry(name, dtype, shape, base + begin, end - begin))
    return sorted(entries, key=lambda e: e.start)


def _pread_into(fd: int, dest: Any, offset: int) -> None:
    """Fill the writable buffer `dest` from file offset `offset` (preadv may return fewer bytes than asked)."""
    view, done = memoryview(dest).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ValueError(f"the file ends {len(view) - done} bytes early at offset {offset + done}")
        done += got


class _Slot:
    def __init__(self, chunk_bytes: int) -> None:
        self.host = torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
        self.event = torch.cuda.Event()


class Reader:
    """Reads tensors of safetensors files onto `device`; one per load (it owns the pinned chunks and threads)."""

    def __init__(self, device: torch.device, chunk_bytes: int = CHUNK_BYTES, chunks: int = CHUNKS,
                 readers: int = READERS) -> None:
        self.device, self.chunk_bytes = device, chunk_bytes
        self.pool = ThreadPoolExecutor(readers, thread_name_prefix="hybrid-engine-read")
        self.cuda = device.type == "cuda"
        self.free: list[_Slot] = [_Slot(chunk_bytes) for _ in range(chunks)] if self.cuda else []
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def tensors(self, path: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor on the device in the file's dtype) for each tensor of `path`, in file order."""
        entries = read_header(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            for entry in entries:
                yield entry.name, self._read(fd, entry)
        finally:
            os.close(fd)

    def _read(self, fd: int, entry: Entry) -> torch.Tensor:
        out = torch.empty(entry.nbytes, dtype=torch.uint8, device=self.device)
        spans = [(p, min(self.chunk_bytes, entry.nbytes - p)) for p in range(0, entry.nbytes, self.chunk_bytes)]
        if self.cuda:
            self._read_cuda(fd, entry.start, spans, out)
        else:  # the chunks straight into the tensor, in parallel
            view = out.numpy()
            for future in [self.pool.submit(_pread_into, fd, view[p:p + n], entry.start + p) for p, n in spans]:
                future.result()
        return out.view(entry.dtype).view(entry.shape) if entry.nbytes else torch.empty(entry.shape, dtype=entry.dtype,
                                                                                         device=self.device)

    def _read_cuda(self, fd: int, start: int, spans: list[tuple[int, int]], out: torch.Tensor) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # `out` was allocated on that stream
        pending: deque = deque()
        todo = deque(spans)
        while todo or pending:
            while todo and self.free:  # a free chunk: its last copy to the card has finished before it is refilled
                slot = self.free.pop()
                pos, n = todo.popleft()
                slot.event.synchronize()
                pending.append((slot, pos, n, self.pool.submit(_pread_into, fd, slot.host[:n].numpy(), start + pos)))
            slot, pos, n, future = pending.popleft()
            future.result()
            with torch.cuda.stream(self.stream):
                out[pos:pos + n].copy_(slot.host[:n], non_blocking=True)
                slot.event.record(self.stream)
            self.free.append(slot)
        out.record_stream(self.stream)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
