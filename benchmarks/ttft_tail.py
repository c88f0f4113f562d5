"""Where the slow requests' time goes: TTFT of graph-replayed prefills, phase by phase (phases.PhaseTimer).

    PYTHONPATH=. python3 benchmarks/ttft_tail.py [--lengths 50,200] [--runs 200] [--out FILE]

Loads with capture="idle", waits until every graph is captured, then sends `--runs` requests per length back to
back (fresh random prompts, max_tokens=1, as the benchmark's TTFT runs). Reports p50 / p99 / max of the engine's
TTFT and of each phase, and the phases of the five slowest requests: a tail in `prefill_gpu` is the GPU's, a tail in
`pop_wait` with a steady `prefill_gpu` is the host waking late, a tail in `stage` / `replay_enqueue` is the host
being late before the launch. Per request also: the serving thread's CPU time, context switches, system time and
page faults (getrusage), the CPU it ran on and the interrupts that CPU took (/proc/interrupts); per length the host's
steal time. Together they tell a preempted thread, a thread held in the kernel or in interrupts, and a slow CPU
apart; `cpu_probe.py` run beside it tells whether a slow window hits one CPU or all.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import time

import torch

from hybrid_engine import LLM, SamplingParams

from phases import PhaseTimer, pct



def _steal_ticks() -> int:
    """CPU time the hypervisor gave to others (all CPUs, USER_HZ ticks; /proc/stat's 8th field)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


_libc = ctypes.CDLL(None)


def _irqs_per_cpu() -> list[int]:
    """Interrupts handled so far by each CPU (/proc/interrupts, all sources)."""
    with open("/proc/interrupts") as f:
        ncpu = len(f.readline().split())
        totals = [0] * ncpu
        for line in f:
            cols = line.split()[1:ncpu + 1]
            for c, v in enumerate(cols):
                if v.isdigit():
                    totals[c] += int(v)
    return totals


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--lengths", default="50,200")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = LLM(args.model, capture="idle")
    llm.graphs.worker.wait_idle(timeout=120)
    g = torch.Generator().manual_seed(0)
    vocab = llm.model.args.vocab_size
    sp = SamplingParams(max_tokens=1, temperature=0)
    res: dict = {"device": torch.cuda.get_device_name(), "model": args.model, "runs": args.runs, "lengths": {}}
    t_start = time.monotonic()
    with PhaseTimer(llm) as pt:
        for n in map(int, args.lengths.split(",")):
            rows = []
            steal0 = _steal_ticks()
            for i in range(args.runs + 3):
                ids = torch.randint(3, vocab, (n,), generator=g).tolist()
                irq0, cpu_a = _irqs_per_cpu(), _libc.sched_getcpu()
                ru0, cpu0 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time()
                out = llm.generate({"prompt_token_ids": ids}, sp)[0]
                cpu1, ru1 = time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD)
                cpu_b, irq1 = _libc.sched_getcpu(), _irqs_per_cpu()
                row = {"i": i, "t_s": round(time.monotonic() - t_start, 3),
                       "t_mono": round(time.monotonic(), 4), "ttft": round(out.metrics.ttft_s * 1e3, 3),
                       **pt.take(), "thread_cpu": round((cpu1 - cpu0) * 1e3, 3),
                       "invol_switches": ru1.ru_nivcsw - ru0.ru_nivcsw, "vol_switches": ru1.ru_nvcsw - ru0.ru_nvcsw,
                       "sys_ms": round((ru1.ru_stime - ru0.ru_stime) * 1e3, 3),
                       "minflt": ru1.ru_minflt - ru0.ru_minflt, "majflt": ru1.ru_majflt - ru0.ru_majflt,
                       "cpu": cpu_a if cpu_a == cpu_b else f"{cpu_a}->{cpu_b}",
                       "irqs_on_cpu": irq1[cpu_b] - irq0[cpu_b], "irqs_all": sum(irq1) - sum(irq0)}
                if i >= 3:  # three warm-up requests per length
                    rows.append(row)
            res.setdefault("host_steal_ticks", {})[str(n)] = _steal_ticks() - steal0
            keys = sorted({k for r in rows for k in r} - {"i", "t_s", "t_mono", "cpu"})
            stats = {k: {"p50": round(statistics.median(v), 3), "p99": round(pct(v, 0.99), 3),
                         "max": round(max(v), 3)} for k in keys if (v := [r[k] for r in rows if k in r])}
            slowest = sorted(rows, key=lambda r: -r["ttft"])[:5]
            res["lengths"][str(n)] = {"phases_ms": stats, "slowest": slowest, "rows": rows}
            print(n, json.dumps(stats))
            for r in slowest:
                print("   slow:", json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    llm.close()


if __name__ == "__main__":
    main()
