"""CaptureWorker scheduling (device-independent: runs on the CPU with a recording capture function)."""
import threading
import time

from hybrid_engine.graphs import DECODE, CaptureWorker


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


def test_failure_is_counted_and_not_retried():
    w, done = _worker(fail=(32,))
    w.run_all()
    assert 32 in w.failed and "boom 32" in w.failed[32]
    assert 32 not in w.captured and done == [DECODE, 16, 64, 128]
    assert w.pending() == []


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
