"""Is the host's CPU slow in bursts, and on which CPUs? One process per listed CPU (pinned there) counts how many
iterations of a fixed pure-Python loop it completes in each 2 ms window; a window far below that CPU's median is a
slow window. Run beside a latency benchmark (gpu_check.sh stage `ptail`) and compare the windows' times
(CLOCK_MONOTONIC, shared by all processes) with the slow requests' `t_mono` in ttft_tail.json.

    python3 benchmarks/cpu_probe.py --cpus 0,5,10,15 --seconds 20 --out probe.json

A probe keeps one CPU busy; list CPUs the benchmark can spare (it is not pinned and moves to a free one).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

WINDOW_S = 0.002


def _probe(cpu: int, seconds: float, q: "mp.Queue") -> None:
    os.sched_setaffinity(0, {cpu})
    counts, starts = [], []
    end = time.monotonic() + seconds
    now = time.monotonic()
    while now < end:
        t0, n = now, 0
        while now - t0 < WINDOW_S:
            sum(range(50))  # the unit of work: a fixed bytecode loop, no memory traffic to speak of
            n += 1
            now = time.monotonic()
        counts.append(n)
        starts.append(t0)
    med = statistics.median(counts)
    slow = [(round(t, 4), round(c / med, 3)) for t, c in zip(starts, counts) if c < 0.5 * med]
    q.put({"cpu": cpu, "windows": len(counts), "median_iters": med, "slow_windows": slow})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpus", default="0")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    q: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_probe, args=(int(c), args.seconds, q)) for c in args.cpus.split(",")]
    for p in procs:
        p.start()
    res = sorted((q.get() for _ in procs), key=lambda r: r["cpu"])
    for p in procs:
        p.join()
    for r in res:
        slow = r["slow_windows"]
        print(f"cpu {r['cpu']}: {len(slow)} of {r['windows']} windows below half speed"
              + (f", first at {slow[0][0]}, last at {slow[-1][0]}" if slow else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
