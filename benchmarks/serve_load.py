"""Serve load: the real server process, N concurrent streaming clients (SSE, token-id prompts, greedy), against the
same requests sent one at a time in the same run (BENCHMARKS.md "serve load").

  python benchmarks/serve_load.py --model llama-2-7b-shape --clients 32 --out serve_load.json

Reports client-seen per-token latency (gaps between streamed chunks) p50/p99, total generated tokens per second,
the one-at-a-time throughput, and whether every concurrent answer equals the one served alone.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from pathlib import Path

import httpx

from load import free_port, serial_vs_concurrent, start_server, wait_ready

def start(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = start_server(args.model, port, log, "--max-queue", str(max(64, 2 * args.clients)), *args.server_args)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, args.ready_s)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        raise SystemExit(f"{exc}:\n{log.read_text(errors='replace')[-3000:]}") from None
    return proc, base


def stream_one(client: httpx.Client, base: str, model: str, ids: list[int],
               max_tokens: int) -> tuple[list[float], str]:
    """Streams one completion over the shared `client`; returns the arrival times of its chunks and its text."""
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    times, text = [], []
    with client.stream("POST", f"{base}/v1/completions", json=body) as r:
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


def engine_counts(base: str) -> dict[str, float]:
    """The engine's step counters from /metrics (steps by kind, decode steps by batch size, chunks, preemptions)."""
    out = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith(("hybrid_engine_graph_steps", "hybrid_engine_jit_steps", "hybrid_engine_prefill_",
                            "hybrid_engine_preemptions", "hybrid_engine_decode_batch_sizes")):
            out[name.removeprefix("hybrid_engine_")] = float(value)
    return out


def run(base: str, args: argparse.Namespace) -> dict:
    # One client (connection pool) for every request, serial and concurrent alike, as a load generator keeps one:
    # making an httpx.Client costs ~20-40 ms of the GIL (its SSL context), which 32 threads would pay one after
    # another before their requests leave.
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=args.clients + 4)) as client:
        return _run(client, base, args)


def _run(client: httpx.Client, base: str, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, args.vocab) for _ in range(args.prompt_tokens)] for _ in range(args.clients)]
    for _ in range(4):  # warm-up on other prompts (none of the measured ones may sit in the prefix cache)
        stream_one(client, base, args.model, [rng.randrange(3, args.vocab) for _ in range(args.prompt_tokens)], 4)
    wait_captures(base, args.capture_wait_s)
    def reset() -> None:  # the concurrent requests must not reuse the KV the serial ones left in the prefix cache
        httpx.post(f"{base}/reset_prefix_cache").raise_for_status()

    res = serial_vs_concurrent(lambda i: stream_one(client, base, args.model, prompts[i], args.max_tokens), args.clients,
                               args.max_tokens, between=reset, engine_counts=lambda: engine_counts(base))
    return {**res, "prompt_tokens": args.prompt_tokens,
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
    proc, base = start(args, log)
    try:
        res = run(base, args)
    finally:
        proc.terminate()
        proc.wait(30)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "engine_stats"}))


if __name__ == "__main__":
    main()
