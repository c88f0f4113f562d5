"""load_to_ready_s: wall time from `LLM(model)` in a fresh process until it has served a first request, with an empty
Triton cache ("cold") and then with the cache that run filled ("warm"), as BENCHMARKS.md's `load_to_ready_s`.

    python benchmarks/load_to_ready.py --model llama-2-7b-shape [--results results.json] [--out load.json]

Each run is its own process (imports included in `process_s`, not in `load_to_ready_s`); `llm_s` is `LLM(...)`
alone, `phases_s` its phases (`LLM.load_phases_s`), `first_request_ms` the first 50-token request with one
generated token. With --results, the numbers are
added to that results file's `systems.hybrid`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from hybrid_engine import LLM, SamplingParams
t1 = time.perf_counter()
llm = LLM(sys.argv[1])
t2 = time.perf_counter()
llm.generate({"prompt_token_ids": list(range(3, 53))}, SamplingParams(max_tokens=1, temperature=0))
t3 = time.perf_counter()
print("RESULT " + json.dumps({"import_s": t1 - t0, "llm_s": t2 - t1, "first_request_ms": (t3 - t2) * 1e3,
                              "load_to_ready_s": t3 - t1, "phases_s": llm.load_phases_s}))
llm.close()
"""


def run_child(code: str, args: list[str], cache_dir: str, timeout_s: float,
              env: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh Python process (this checkout first on its path, `cache_dir` as its Triton cache, `env`
    added) and return the JSON it printed on its "RESULT " line, with `process_s` (the process's wall time)."""
    env = {**os.environ, **(env or {}), "TRITON_CACHE_DIR": cache_dir,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s, cwd=REPO)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the child exited {proc.returncode}: {proc.stderr[-2000:]}")
    return {**json.loads(line[7:]), "process_s": wall}


def one(model: str, cache_dir: str, timeout_s: float, compile_workers: str | None = None,
        pycache_dir: str | None = None) -> dict:
    extra = {"HYBRID_ENGINE_COMPILE_WORKERS": compile_workers} if compile_workers is not None else {}
    if pycache_dir is not None:
        extra["PYTHONPYCACHEPREFIX"] = pycache_dir
    res = run_child(CHILD, [model], cache_dir, timeout_s, extra)
    print({k: res[k] for k in ("llm_s", "phases_s")}, flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--timeout-s", type=float, default=240)
    ap.add_argument("--compile-workers", default=None,
                    help="HYBRID_ENGINE_COMPILE_WORKERS of the children (e.g. auto: the load's kernels compiled on "
                         "parallel threads; default: the engine's)")
    ap.add_argument("--pycache", action="store_true",
                    help="the children keep Python's bytecode in a directory of their own (PYTHONPYCACHEPREFIX, "
                         "filled by the cold run), for an installation whose site-packages hold no .pyc files and "
                         "cannot take them, where every process would otherwise compile the modules load imports")
    ap.add_argument("--results", type=Path, help="a results file whose systems.hybrid gets load_to_ready_s")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache, \
            tempfile.TemporaryDirectory(prefix="pycache-") as pycache:
        kw = {"compile_workers": args.compile_workers, "pycache_dir": pycache if args.pycache else None}
        cold = one(args.model, cache, args.timeout_s, **kw)
        warm = one(args.model, cache, args.timeout_s, **kw)
    res = {"model": args.model, "compile_workers": args.compile_workers, "pycache": args.pycache,
           "load_to_ready_s": {"cold": round(cold["load_to_ready_s"], 2), "warm": round(warm["load_to_ready_s"], 2)},
           "runs": {"cold": cold, "warm": warm}}
    print(json.dumps(res["load_to_ready_s"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    if args.results:
        results = json.loads(args.results.read_text())
        hybrid = results.setdefault("systems", {}).setdefault("hybrid", {})
        hybrid["load_to_ready_s"] = res["load_to_ready_s"]
        hybrid["load_to_ready_runs"] = res["runs"]
        tmp = args.results.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
