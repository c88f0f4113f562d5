"""Line-level host time of a graph-replayed request (the TTFT critical path's host part), with line_profiler.

    PYTHONPATH=. python3 benchmarks/host_path.py [--length 50] [--runs 300]

Loads with capture="idle", waits for every capture, then sends `--runs` max_tokens=1 requests of `--length` tokens
(fresh random ids) with the engine's serving-path functions under line_profiler, and prints, per function, the
lines costing more than 1 us per hit. line_profiler adds ~0.3-1 us per line: compare lines, not totals. Then, without
the profiler, the same requests with the critical path's CUDA calls through the driver (cuda_driver.py) and through
torch, interleaved request by request: p50 / p99 of the engine's TTFT and of generate()'s wall time for each.
"""
from __future__ import annotations

import argparse
import io
import time

import torch

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.engine import core, llm as engine_llm, scheduler
from hybrid_engine.runtime import cuda_driver, graphs, runner, token_reader

from phases import pct


def main() -> None:
    try:
        from line_profiler import LineProfiler
    except ImportError:
        raise SystemExit("host_path.py needs line_profiler (pip install line_profiler; on the GPU host, carry its "
                         "wheel and install it to a --target on PYTHONPATH)") from None

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--length", type=int, default=50)
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    llm = LLM(args.model, capture="idle")
    llm.graphs.worker.wait_idle(timeout=120)
    fns = [engine_llm.LLM.generate, engine_llm.LLM._prompt_ids, engine_llm.LLM._submit, engine_llm.LLM._collect,
           core.EngineCore.next_delta, core.EngineCore.step, core.EngineCore._read_one, core.EngineCore._accept,
           scheduler.Scheduler.admit, scheduler.Scheduler.plan_decode, runner.ModelRunner.prefill,
           runner.ModelRunner.stage_prefill, runner.ModelRunner.decode, graphs.GraphRunner.ready_prefill_bucket,
           graphs.CaptureWorker.set_busy, token_reader.TokenReader.push, token_reader.TokenReader.pop]
    lp = LineProfiler(*fns)
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(max_tokens=1, temperature=0)
    prompts = [{"prompt_token_ids": torch.randint(3, llm.model.args.vocab_size, (args.length,), generator=g).tolist()}
               for _ in range(args.runs + 10)]
    for p in prompts[:10]:
        llm.generate(p, sp)
    lp.enable()
    for p in prompts[10:]:
        llm.generate(p, sp)
    lp.disable()
    buf = io.StringIO()
    lp.print_stats(stream=buf, output_unit=1e-6)
    for line in buf.getvalue().splitlines():
        cols = line.split()
        if line.startswith(("Total time", "File:", "Function:")) or (
                len(cols) > 4 and cols[0].isdigit() and cols[1].isdigit() and float(cols[3]) >= 1.0):
            print(line[:150])
    ab: dict[bool, dict[str, list[float]]] = {True: {"ttft": [], "wall": []}, False: {"ttft": [], "wall": []}}
    for i, p in enumerate(prompts[10:] * 2):
        on = i % 2 == 0
        cuda_driver.set_enabled(on)
        t = time.perf_counter()
        out = llm.generate(p, sp)[0]
        ab[on]["wall"].append((time.perf_counter() - t) * 1e3)
        ab[on]["ttft"].append(out.metrics.ttft_s * 1e3)
    cuda_driver.set_enabled(True)
    for on, d in ab.items():
        print(f"driver calls {'on ' if on else 'off'}:", {k: {"p50": round(pct(v, 0.5), 3), "p99": round(pct(v, 0.99), 3)}
                                                       for k, v in d.items()})
    llm.close()


if __name__ == "__main__":
    main()
