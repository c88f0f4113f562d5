"""Where `LLM(model)` spends its load time: a fresh process per run under cProfile, functions by cumulative and own
time, with an empty Triton cache and then with the cache that run filled (as `load_to_ready.py` times them).

    python benchmarks/load_profile.py --model llama-2-7b-shape --out load_profile.json [--top 40]

The wall times are the profiled ones (cProfile adds a few percent to Python-heavy phases); the GPU work of load is
seen through the host functions that wait for it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from load_to_ready import fill_bytecode, run_child  # noqa: E402

CHILD = """
import cProfile, json, pstats, sys, time
top = int(sys.argv[2])
t0 = time.perf_counter()
from hybrid_engine import LLM, SamplingParams
t1 = time.perf_counter()
prof = cProfile.Profile()
prof.enable()
llm = LLM(sys.argv[1])
prof.disable()
t2 = time.perf_counter()
llm.generate({"prompt_token_ids": list(range(3, 53))}, SamplingParams(max_tokens=1, temperature=0))
t3 = time.perf_counter()
stats = pstats.Stats(prof)
rows = []
for (file, line, name), (calls, _, own, cum, _) in stats.stats.items():
    where = file.split("site-packages/")[-1].split("hybrid_engine/")[-1]
    rows.append({"function": f"{where}:{line}({name})", "calls": calls, "own_s": round(own, 3), "cum_s": round(cum, 3)})
print("RESULT " + json.dumps({"import_s": t1 - t0, "llm_s": t2 - t1, "first_request_ms": (t3 - t2) * 1e3,
                              "by_cumulative": sorted(rows, key=lambda r: -r["cum_s"])[:top],
                              "by_own": sorted(rows, key=lambda r: -r["own_s"])[:top]}))
llm.close()
"""


def one(model: str, cache_dir: str, top: int, timeout_s: float, pycache_dir: str | None) -> dict:
    env = {"PYTHONPYCACHEPREFIX": pycache_dir} if pycache_dir else None
    return run_child(CHILD, [model, str(top)], cache_dir, timeout_s, env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--timeout-s", type=float, default=240)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pycache", action="store_true",
                    help="the children write and reuse compiled bytecode in a directory of their own, filled first "
                         "(as load_to_ready.py --pycache: for an image that sets PYTHONDONTWRITEBYTECODE)")
    args = ap.parse_args()
    res: dict = {"model": args.model, "pycache": args.pycache}
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache, \
            tempfile.TemporaryDirectory(prefix="pycache-") as pycache:
        pyc = pycache if args.pycache else None
        if pyc:
            fill_bytecode(pyc, cache, args.timeout_s)
        res["cold"] = one(args.model, cache, args.top, args.timeout_s, pyc)
        res["warm"] = one(args.model, cache, args.top, args.timeout_s, pyc)
    for kind in ("cold", "warm"):
        r = res[kind]
        print(kind, f"LLM() {r['llm_s']:.1f} s, first request {r['first_request_ms']:.0f} ms; top cumulative:",
              flush=True)
        for row in r["by_cumulative"][:25]:
            print(f"  {row['cum_s']:8.2f} {row['own_s']:8.2f} {row['calls']:7d}  {row['function'][:110]}")
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
