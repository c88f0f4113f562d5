"""CaptureWorker scheduling (device-independent: runs on the CPU with a recording capture function)."""
import threading
import time

from hybrid_engine.runtime.graphs import DECODE as _DECODE, CaptureWorker, decode_buckets

DECODE = (_DECODE, 1)  # the batch-1 decode graph's key
from hybrid_engine.models import llama


def _worker(policy="idle", fail=()):
    done = []

    def capture(key):
        if key in fail:
            raise RuntimeError(f"boom {key}")
        done.append(key)

    return CaptureWorker([DECODE, 16, 32, 64, 128], capture, policy, quiet_s=0.05), done


def test_decode_first_then_demand_then_ladder():
    w, done = _worker()
    w.record_demand(64)
    w.record_demand(64)
    w.record_demand(128)
    assert w.pending() == [DECODE, 64, 128, 16, 32]
    w.run_all()
    assert done == [DECODE, 64, 128, 16, 32] and w.pending() == []


def test_every_decode_bucket_before_any_prefill_bucket():
    w = CaptureWorker([16, (_DECODE, 4), 32, DECODE], lambda key: None)
    w.record_demand(32)
    assert w.pending() == [(_DECODE, 4), DECODE, 32, 16]
    assert decode_buckets(32) == [1, 2, 4, 8, 16, 32] and decode_buckets(12) == [1, 2, 4, 8, 12]
    assert decode_buckets(1) == [1]
    assert decode_buckets(32, (16,)) == [16, 32] and decode_buckets(16, (16,)) == [16]
    assert decode_buckets(32, (1, 16)) == [1, 16, 32] and decode_buckets(12, (4, 8, 12)) == [4, 8, 12]


def test_failure_is_counted_and_not_retried():
    w, done = _worker(fail=(32,))
    w.run_all()
    assert 32 in w.failed and "boom 32" in w.failed[32]
    assert 32 not in w.captured and done == [DECODE, 16, 64, 128]
    assert w.pending() == []


def test_worker_freezes_gc_once_its_last_capture_is_done(monkeypatch):
    """What the captures made is frozen out of the cyclic GC (hybrid_engine/runtime/_gc.py) when nothing is left pending,
    including after a failed last capture, and not before."""
    from hybrid_engine.runtime import graphs

    calls = []
    w, done = _worker(fail=(128,))
    monkeypatch.setattr(graphs._gc, "freeze", lambda: calls.append(list(done)))
    w.run_one(DECODE)
    w.run_one(16)
    assert calls == []
    w.run_all()
    assert calls == [[DECODE, 16, 32, 64]]  # once, after the last (failed) capture


def test_idle_policy_waits_while_busy():
    w, done = _worker()
    w.set_busy(True)
    w.start()
    time.sleep(0.3)
    assert done == []  # a request is in flight: nothing captured
    w.set_busy(False)
    assert w.wait_idle(timeout=10)
    assert done[0] == DECODE and len(done) == 5
    w.stop()


def test_eager_policy_captures_before_returning():
    w, done = _worker(policy="eager")
    w.start()
    assert len(done) == 5 and w._thread is None


def test_one_capture_at_a_time():
    active, peak = [0], [0]
    lock = threading.Lock()

    def capture(key):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1

    w = CaptureWorker([DECODE, 1, 2, 3], capture, quiet_s=0.0)
    w.start()
    for k in (1, 2, 3):
        w.record_demand(k)
    assert w.wait_idle(timeout=10)
    w.stop()
    assert peak[0] == 1


def test_idle_window_starts_after_quiet_period():
    w, done = _worker()
    w.quiet_s = 0.5
    w.set_busy(True)
    w.set_busy(False)
    w.start()
    time.sleep(0.2)
    assert done == []  # still inside the quiet period after the last request
    assert w.wait_idle(timeout=10) and len(done) == 5
    w.stop()


def test_capture_pauses_between_layers_while_a_request_is_in_flight():
    started, go, layers, hooks = threading.Event(), threading.Event(), [], []

    def capture(key):  # stands in for a model forward inside a capture: calls the between-layers hook
        hook = getattr(llama._LAYER_HOOK, "fn", None)
        hooks.append(hook)
        started.set()
        go.wait(5)
        for i in range(3):
            hook()
            layers.append(i)

    w = CaptureWorker([DECODE], capture, quiet_s=0.0)
    w.start()
    assert started.wait(5)
    w.set_busy(True)  # a request arrives mid-capture
    go.set()
    time.sleep(0.3)
    assert layers == []  # paused at the first layer boundary while the request is in flight
    w.set_busy(False)
    assert w.wait_idle(timeout=10)
    assert layers == [0, 1, 2] and w.captured == {DECODE}
    w.stop()
    assert hooks[0] is not None and getattr(llama._LAYER_HOOK, "fn", None) is None  # worker thread only


def test_captures_on_the_serving_thread_never_pause():
    seen = []
    w = CaptureWorker([DECODE, 16], lambda key: seen.append(getattr(llama._LAYER_HOOK, "fn", None)))
    w.set_busy(True)  # run_one / run_all run on the caller's thread: a pause there could never end
    w.run_one(DECODE)
    w.run_all()
    assert seen == [None, None] and w.captured == {DECODE, 16}


def test_model_forward_calls_the_hook_after_each_layer():
    from transformers import LlamaConfig

    from hybrid_engine import LLM, SamplingParams

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    from transformers import AutoModelForCausalLM

    llm = LLM(AutoModelForCausalLM.from_config(cfg).eval(), device="cpu", dtype="float32", max_model_len=32)
    calls = []
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    with llama.between_layers(lambda: calls.append(1)):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, sp)
    assert len(calls) == 3 * 2  # prefill + one decode step, 3 layers each
    llm.generate({"prompt_token_ids": [5, 6, 7]}, sp)
    assert len(calls) == 6  # removed on exit


def test_set_busy_takes_no_lock_once_every_key_is_done():
    """After the last capture (or failure) set_busy only flips the flags: no lock, no wake-up, on the request's
    critical path. Before that it wakes the worker when a request ends with work left."""
    w, done = _worker(fail=(64,))
    w.run_one(DECODE)

    class CountingCondition:
        def __init__(self, cond):
            self.cond, self.entered, self.notified = cond, 0, 0

        def __enter__(self):
            self.entered += 1
            return self.cond.__enter__()

        def __exit__(self, *exc):
            return self.cond.__exit__(*exc)

        def notify_all(self):
            self.notified += 1
            self.cond.notify_all()

    counting = w._cond = CountingCondition(w._cond)
    w.set_busy(True)
    w.set_busy(False)
    assert counting.entered == 2 and counting.notified == 1  # work left: the worker is woken
    w.run_all()
    entered, notified = counting.entered, counting.notified
    w.set_busy(True)
    assert w._busy
    w.set_busy(False)
    assert not w._busy and w._last_busy > 0
    assert (counting.entered, counting.notified) == (entered, notified)
    assert done == [DECODE, 16, 32, 128] and 64 in w.failed


def test_split_step_graphs_wait_for_demand_then_are_captured_in_an_idle_window():
    """The constrained batch's forward/sample graphs are pending only once asked for; a worker that was done wakes
    up for them when the request that asked ends."""
    from hybrid_engine.runtime.graphs import DECODE_FORWARD, DECODE_SAMPLE

    done = []
    split = [(DECODE_FORWARD, 1), (DECODE_SAMPLE, 1)]
    w = CaptureWorker([DECODE, *split, 16], done.append, quiet_s=0.0, on_demand=split)
    assert w.pending() == [DECODE, 16]
    w.start()
    try:
        assert w.wait_idle(10) and done == [DECODE, 16]
        w.set_busy(True)
        for key in split:
            w.record_demand(key)
        assert w.pending() == split
        time.sleep(0.1)
        assert done == [DECODE, 16]  # busy: nothing captured yet
        w.set_busy(False)
        assert w.wait_idle(10) and done == [DECODE, 16, *split]
    finally:
        w.stop()
    eager = CaptureWorker([DECODE, *split], lambda key: None, policy="eager", on_demand=split)
    assert eager.pending() == [DECODE, *split]  # "eager" captures everything, asked for or not


def test_sustained_load_starves_no_demanded_key():
    """No idle window (a request always in flight): a key a request asked for waits starve_s, then `starved_key`
    names it for a capture between steps; keys nobody asked for still wait for an idle window."""
    done = []
    w = CaptureWorker([DECODE, 16, 32, 64], done.append, quiet_s=0.05, starve_s=1.0)
    w.run_one(DECODE)
    w.set_busy(True)
    w.start()
    assert w.starved_key() is None  # nothing asked for yet
    w.record_demand(32)
    assert w.starved_key() is None  # asked for just now
    time.sleep(1.2)
    assert w.starved_key() == 32 and done == [DECODE]  # the worker itself never captured: no idle window
    w.run_one(w.starved_key())  # what GraphRunner.capture_if_starved does on the serving thread
    assert done == [DECODE, 32]
    assert w.starved_key() is None  # 16 and 64: no request asked for them
    w.record_demand(64)
    assert w.starved_key() is None  # waits from the last capture on
    time.sleep(1.2)
    assert w.starved_key() == 64
    w.set_busy(False)  # an idle window after all: the worker captures the rest itself
    assert w.wait_idle(timeout=10)
    assert sorted(done[2:], key=str) == [16, 64] and w.starved_key() is None
    w.stop()


def test_a_capture_on_the_serving_thread_excludes_the_worker():
    """One capture at a time, whichever thread starts it: the worker waits while the serving thread captures."""
    active, peak = [0], [0]
    lock = threading.Lock()
    entered = threading.Event()

    def capture(key):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        entered.set()
        time.sleep(0.2)
        with lock:
            active[0] -= 1

    w = CaptureWorker([DECODE, 16, 32], capture, quiet_s=0.0, starve_s=0.0)
    w.record_demand(16)
    serving = threading.Thread(target=w.run_one, args=(16,))
    serving.start()
    assert entered.wait(5)
    w.start()  # idle: the worker would capture at once, but the serving thread's capture is open
    serving.join()
    assert w.wait_idle(timeout=10)
    w.stop()
    assert peak[0] == 1
    assert w.starved_key() is None  # everything captured


def test_eager_policy_never_starves():
    w = CaptureWorker([DECODE, 16], lambda key: None, policy="eager", starve_s=0.0)
    w.record_demand(16)
    assert w.starved_key() is None
