"""Reads sampled tokens back to the host one step behind the GPU (pinned ring buffer + events)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from . import cuda_driver


def wait_event(event: torch.cuda.Event, watch: Callable[[], None] | None) -> None:
    """Wait for `event`. With a `watch` (tensor parallelism: raises once a worker process has died, whose peers'
    collectives would otherwise never finish) poll the event and call `watch` while waiting."""
    if watch is None:
        event.synchronize()
        return
    spins = 0
    while not event.query():
        spins += 1
        if spins % 64 == 0:
            watch()
        time.sleep(0)  # lets other threads run; a step is milliseconds, a poll microseconds


class TokenReader:
    """push() after each enqueued step copies the token buffer into a pinned slot and records an event, on the
    current stream (through the driver where cuda_driver.available(); else torch, recording on `stream`, the serving
    stream, given so that no current-stream lookup costs host time); pop() waits on that event only (never a
    device-wide synchronize) and returns the oldest tokens, read through a numpy view of the pinned ring."""

    def __init__(self, src: torch.Tensor, device: torch.device, depth: int = 4,
                 stream: torch.cuda.Stream | None = None) -> None:
        self.src, self.depth, self.stream = src, depth, stream
        cuda = device.type == "cuda"
        self.ring = torch.zeros((depth, *src.shape), dtype=src.dtype, pin_memory=cuda)
        self._slots = list(self.ring)  # views made once, not per push
        self._host = self.ring.numpy()
        self.events = [torch.cuda.Event() for _ in range(depth)] if cuda else None
        self.head = self.tail = 0
        self.watch: Callable[[], None] | None = None  # see wait_event

    def reset(self) -> None:
        self.head = self.tail = 0

    def push(self) -> None:
        if self.head - self.tail >= self.depth:
            raise RuntimeError("TokenReader overrun: pop() before pushing more steps")
        slot = self.head % self.depth
        if self.events is not None and cuda_driver.available():
            cuda_driver.copy_to_host(self._slots[slot], self.src)
            cuda_driver.record(self.events[slot], self.src.device.index)
        else:
            self._slots[slot].copy_(self.src, non_blocking=True)
            if self.events is not None:
                self.events[slot].record(self.stream)
        self.head += 1

    def pop(self) -> list[int]:
        slot = self.tail % self.depth
        if self.events is not None:
            wait_event(self.events[slot], self.watch)
        self.tail += 1
        return self._host[slot].tolist()
