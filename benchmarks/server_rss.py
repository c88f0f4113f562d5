#!/usr/bin/env python
"""Server memory under oversized requests: RSS of a real `python -m hybrid_engine.server` process.

    python benchmarks/server_rss.py [--model tiny-llama] [--requests 20] [--body-mb 5] [--bound-mb 50]

Starts the server, warms it up with a few normal requests, then sends --requests completions whose body is
--body-mb MB (over the default --max-request-bytes: answered 413 unread) and as many whose prompt is just under
the byte limit but over the prompt character cap (parsed, answered 400 untokenized). Prints RSS before, after
each series and after a short idle, and exits 1 when either series grew the server's RSS by --bound-mb or more.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from hybrid_engine.server.limits import DEFAULT_MAX_REQUEST_BYTES  # noqa: E402
from load import free_port, start_server, wait_ready  # noqa: E402


def rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def series(base: str, model: str, body: bytes, n: int, expect: int) -> list[float]:
    """n posts of one body; returns the seconds each took. Any other status than `expect` is an error."""
    seconds = []
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.post(f"{base}/v1/completions", content=body, headers={"content-type": "application/json"})
            seconds.append(time.perf_counter() - t0)
            if r.status_code != expect:
                raise RuntimeError(f"expected {expect}, got {r.status_code}: {r.text[:300]}")
    return seconds


def body_of(model: str, prompt_bytes: int) -> bytes:
    return json.dumps({"model": model, "prompt": "hello " * (prompt_bytes // 6), "max_tokens": 4}).encode()


def measure(args: argparse.Namespace, base: str, proc: psutil.Process) -> dict[str, float]:
    ok = json.dumps({"model": args.model, "prompt": "Hello world", "max_tokens": 8}).encode()
    series(base, args.model, ok, 5, 200)
    out = {"rss_start_mb": rss_mb(proc)}
    t = series(base, args.model, body_of(args.model, int(args.body_mb * 1e6)), args.requests, 413)
    out.update(rss_after_413_mb=rss_mb(proc), ms_per_413=1e3 * sum(t) / len(t))
    t = series(base, args.model, body_of(args.model, DEFAULT_MAX_REQUEST_BYTES - 1024), args.requests, 400)
    out.update(rss_after_400_mb=rss_mb(proc), ms_per_400=1e3 * sum(t) / len(t))
    time.sleep(args.idle_s)
    out["rss_idle_mb"] = rss_mb(proc)
    series(base, args.model, ok, 1, 200)  # still serving
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--body-mb", type=float, default=5.0)
    p.add_argument("--bound-mb", type=float, default=50.0)
    p.add_argument("--idle-s", type=float, default=5.0)
    args = p.parse_args(argv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = start_server(args.model, port, log)
    try:
        wait_ready(server, base)
        out = measure(args, base, psutil.Process(server.pid))
    except (RuntimeError, TimeoutError) as exc:
        print(f"server_rss: {exc}\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        return 2
    finally:
        server.terminate()
        server.wait(30)
    grow_413 = out["rss_after_413_mb"] - out["rss_start_mb"]
    grow_400 = out["rss_after_400_mb"] - out["rss_start_mb"]
    print(f"{args.model}: RSS {out['rss_start_mb']:.0f} MiB after warm-up")
    print(f"  {args.requests} x {args.body_mb:g} MB body -> 413 in {out['ms_per_413']:.1f} ms each: "
          f"RSS {out['rss_after_413_mb']:.0f} MiB ({grow_413:+.1f})")
    print(f"  {args.requests} x {DEFAULT_MAX_REQUEST_BYTES - 1024} B prompt over the character cap -> 400 in "
          f"{out['ms_per_400']:.1f} ms each: RSS {out['rss_after_400_mb']:.0f} MiB ({grow_400:+.1f} since warm-up)")
    print(f"  after {args.idle_s:g} s idle: {out['rss_idle_mb']:.0f} MiB")
    worst = max(grow_413, grow_400)
    print(f"server_rss: {'PASS' if worst < args.bound_mb else 'FAIL'} (growth {worst:+.1f} MiB, bound "
          f"{args.bound_mb:g} MiB)")
    return 0 if worst < args.bound_mb else 1


if __name__ == "__main__":
    sys.exit(main())
