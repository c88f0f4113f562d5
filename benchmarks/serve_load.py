"""Serve load: the real server process, N concurrent streaming clients (SSE, token-id prompts, greedy), against the
same requests sent one at a time in the same run (BENCHMARKS.md "serve load").

  python benchmarks/serve_load.py --model llama-2-7b-shape --clients 32 --out serve_load.json

Reports client-seen per-token latency (gaps between streamed chunks) p50/p99, total generated tokens per second,
the one-at-a-time throughput, and whether every concurrent answer equals the one served alone.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = _port()
    cmd = [sys.executable, "-m", "hybrid_engine.server", "--model", args.model, "--port", str(port),
           "--no-access-log", "--log-level", "warning", "--max-queue", str(max(64, 2 * args.clients)),
           *args.server_args]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.ready_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not ready after {args.ready_s} s")


def stream_one(base: str, model: str, ids: list[int], max_tokens: int) -> tuple[list[float], str]:
    """Streams one completion; returns the arrival times of its chunks and its text."""
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    times, text = [], []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return times, "".join(text)


def wait_captures(base: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and httpx.get(f"{base}/health").json()["capture"]["graphs_pending"]:
        time.sleep(0.5)


def run(base: str, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, args.vocab) for _ in range(args.prompt_tokens)] for _ in range(args.clients)]
    for ids in prompts[:4]:  # warm-up: bucket demand, then the worker captures in the idle window
        stream_one(base, args.model, ids, 4)
    wait_captures(base, args.capture_wait_s)
    t0 = time.perf_counter()
    serial = [stream_one(base, args.model, ids, args.max_tokens)[1] for ids in prompts]
    serial_s = time.perf_counter() - t0
    results: list = [None] * args.clients
    barrier = threading.Barrier(args.clients)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = stream_one(base, args.model, prompts[i], args.max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conc_s = time.perf_counter() - t0
    gaps = sorted((b - a) * 1e3 for times, _ in results for a, b in zip(times, times[1:]))
    return {"clients": args.clients, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "client_tpot_p50_ms": gaps[len(gaps) // 2], "client_tpot_p99_ms": gaps[int(len(gaps) * 0.99)],
            "throughput_tok_s": args.clients * args.max_tokens / conc_s,
            "serial_throughput_tok_s": args.clients * args.max_tokens / serial_s,
            "all_correct": [text for _, text in results] == serial,
            "engine_stats": httpx.get(f"{base}/health").json()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--vocab", type=int, default=32000, help="token ids are drawn from [3, vocab)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ready-s", type=float, default=300)
    ap.add_argument("--capture-wait-s", type=float, default=120)
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="passed to the server")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    log = args.out.with_suffix(".server.log")
    proc, base = start_server(args, log)
    try:
        res = run(base, args)
    finally:
        proc.terminate()
        proc.wait(30)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "engine_stats"}))


if __name__ == "__main__":
    main()
