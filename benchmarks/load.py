"""Shared by the load benchmarks: a real server process on a free port, and one set of requests run one at a time
and then all at once (threads released together), with the per-token gaps their clients see."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, log: Path, *extra: str) -> subprocess.Popen:
    """`python -m hybrid_engine.server` from this checkout, output to `log`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "hybrid_engine.server", "--model", model, "--port", str(port), "--no-access-log",
           "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO, env=env)


def wait_ready(proc: subprocess.Popen, base: str, timeout_s: float = 180, log: Callable[[], str] | None = None) -> None:
    """Until the server at `base` answers /health; an early exit or the timeout raises (with `log()` appended)."""
    tail = (lambda: f":\n{log()}") if log is not None else (lambda: "")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited during start-up{tail()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"server not ready after {timeout_s} s{tail()}")


def serial_vs_concurrent(request: Callable[[int], tuple[list[float], Any]], clients: int, tokens: int,
                         between: Callable[[], Any] | None = None,
                         engine_counts: Callable[[], dict[str, float]] | None = None) -> dict:
    """request(i) -> (arrival time of each streamed chunk, answer). Runs every request alone, one after another,
    then (after `between()`, e.g. a prefix-cache reset, so that the concurrent requests do not reuse the KV the
    serial ones left) all `clients` at once: client-seen per-token gaps (p50, p99), generated tokens per second both
    ways, and whether every concurrent answer equals the one served alone. Where the concurrent wall time goes: each
    client's first and last chunk after the start (p50, max), and `engine_counts()` (e.g. steps run, by kind)
    before and after the concurrent phase, as their difference."""
    t0 = time.perf_counter()
    serial = [request(i)[1] for i in range(clients)]
    serial_s = time.perf_counter() - t0
    if between is not None:
        between()
    results: list = [None] * clients
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = request(i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    before = engine_counts() if engine_counts is not None else {}
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conc_s = time.perf_counter() - t0
    gaps = sorted((b - a) * 1e3 for times, _ in results for a, b in zip(times, times[1:]))
    first = sorted((times[0] - t0) * 1e3 for times, _ in results if times)
    last = sorted((times[-1] - t0) * 1e3 for times, _ in results if times)
    timeline = {"wall_ms": conc_s * 1e3, "first_chunk_ms": {"p50": first[len(first) // 2], "max": first[-1]},
                "last_chunk_ms": {"p50": last[len(last) // 2], "max": last[-1]}}
    if engine_counts is not None:
        after = engine_counts()
        timeline["engine"] = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    return {"clients": clients, "max_tokens": tokens, "concurrent_timeline": timeline,
            "client_tpot_p50_ms": gaps[len(gaps) // 2], "client_tpot_p99_ms": gaps[int(len(gaps) * 0.99)],
            "throughput_tok_s": clients * tokens / conc_s, "serial_throughput_tok_s": clients * tokens / serial_s,
            "all_correct": [answer for _, answer in results] == serial}
