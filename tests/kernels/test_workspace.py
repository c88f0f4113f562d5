"""Where the split kernels' workspaces and arrival counters come from (kernels/_workspace.py), on the CPU with
torch's CUDA entry points stubbed: a capture never allocates one (memory allocated inside a capture comes from the
pool every graph shares, where graphs captured earlier keep their intermediates, and its zero-fill would only be
recorded), the warm-up under `reserve_for_capture` makes them, zeroed; a capture that finds none raises."""
import types

import pytest
import torch

from hybrid_engine.kernels import _workspace as ws

DEV = torch.device("cuda", 0)
KEY = ("cached_prefill", 8192, 128, 2, 32)


@pytest.fixture
def fake(monkeypatch):
    """Capture state and stream of the stubbed CUDA calls, and a log of (kind, made while capturing)."""
    state = types.SimpleNamespace(capturing=False, stream=1234, made=[])

    def make(kind):
        def f(n, dtype, device):
            state.made.append((kind, state.capturing))
            return (torch.empty if kind == "empty" else torch.zeros)(n, dtype=dtype)
        return f

    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_current_stream_capturing=lambda: state.capturing),
                                       empty=make("empty"), zeros=make("zeros"), float32=torch.float32,
                                       int32=torch.int32)
    monkeypatch.setattr(ws, "torch", fake_torch)
    monkeypatch.setattr(ws, "_stream_id", lambda device: state.stream)
    monkeypatch.setattr(ws, "_SPLIT_BUFFERS", {})
    monkeypatch.setattr(ws, "_RETIRED", [])
    return state


def _capture(fake, numel=100, counters=64):
    """The graph runner's way: warm-up under reserve_for_capture, then the capture, on one stream."""
    with ws.reserve_for_capture():
        warm = ws.split_buffers(DEV, KEY, numel, counters)
    fake.capturing = True
    try:
        return warm, ws.split_buffers(DEV, KEY, numel, counters)
    finally:
        fake.capturing = False


def test_captures_use_buffers_made_zeroed_before_them(fake):
    warm, first = _capture(fake)
    _, second = _capture(fake)
    assert ("zeros", True) not in fake.made and ("empty", True) not in fake.made
    assert first[1] is second[1] and first[1] is not warm[1]  # graphs share theirs; the warm-up keeps its own
    assert torch.equal(first[1], torch.zeros(64, dtype=torch.int32))
    _, bigger = _capture(fake, numel=200)  # a larger call: new graph-side buffers, the old ones kept for old graphs
    assert bigger[0].numel() == 200 and bigger[0] is not first[0] and any(r is first for r in ws._RETIRED)


def test_a_capture_without_reservation_raises(fake):
    ws.split_buffers(DEV, KEY, 100, 64)  # warmed up, but not under reserve_for_capture
    fake.capturing = True
    with pytest.raises(RuntimeError, match="not reserved"):
        ws.split_buffers(DEV, KEY, 100, 64)
    fake.capturing = False
    _capture(fake)
    fake.stream = 99  # another stream's capture does not find this stream's buffers
    fake.capturing = True
    with pytest.raises(RuntimeError, match="not reserved"):
        ws.split_buffers(DEV, KEY, 100, 64)


def test_reservation_is_per_thread_and_nests(fake):
    import threading

    seen = []
    with ws.reserve_for_capture():
        with ws.reserve_for_capture():
            pass
        seen.append(ws._RESERVING.on)
        t = threading.Thread(target=lambda: seen.append(ws._RESERVING.on))
        t.start()
        t.join()
    seen.append(ws._RESERVING.on)
    assert seen == [True, False, False]
