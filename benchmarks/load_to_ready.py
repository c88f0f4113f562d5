"""load_to_ready_s: wall time from `LLM(model)` in a fresh process until it has served a first request, with an empty
Triton cache ("cold") and then with the cache that run filled ("warm"), as BENCHMARKS.md's `load_to_ready_s`.

    python benchmarks/load_to_ready.py --model llama-2-7b-shape [--results results.json] [--out load.json]

Each run is its own process (imports included in `process_s`, not in `load_to_ready_s`); `llm_s` is `LLM(...)`
alone, `phases_s` its phases (`LLM.load_phases_s`), `first_request_ms` the first 50-token request with one
generated token. With --results, the numbers are
added to that results file's `systems.hybrid`.

Python's bytecode: an installed package has its modules compiled (pip writes the .pyc files at install time). An
image whose site-packages hold none and cannot take them (or that sets PYTHONDONTWRITEBYTECODE) recompiles every
module a load imports in every process: on the H200 machines that made `from transformers import LlamaConfig` alone
11-14 s. --pycache gives the children a bytecode directory of their own and fills it first with a process that only
imports what a load imports, so "cold" and "warm" differ in Triton's cache only, as on an installed package.

A checkpoint directory as --model (e.g. one written by `shape_checkpoint.py`) can be dropped from the page cache
before each run (--evict-page-cache: posix_fadvise DONTNEED on its files), so each load reads it from the disk.
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


PACKAGE = [str(REPO)]  # what the children find hybrid_engine in, first on their path (--package)


def run_child(code: str, args: list[str], cache_dir: str, timeout_s: float,
              env: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh Python process (this checkout first on its path, `cache_dir` as its Triton cache, `env`
    added) and return the JSON it printed on its "RESULT " line, with `process_s` (the process's wall time)."""
    env = {**os.environ, **(env or {}), "TRITON_CACHE_DIR": cache_dir,
           "PYTHONPATH": os.pathsep.join(filter(None, [*PACKAGE, str(REPO), os.environ.get("PYTHONPATH")]))}
    if "PYTHONPYCACHEPREFIX" in (env or {}):
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # a bytecode directory of their own: let them write it
    t0 = time.perf_counter()
    # run from the package's directory: `python -c` puts the working directory first on the path
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s, cwd=PACKAGE[0])
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the child exited {proc.returncode}: {proc.stderr[-2000:]}")
    return {**json.loads(line[7:]), "process_s": wall}


# what a load imports, for filling a bytecode directory without loading anything (Triton's compiler included)
IMPORTS = """
import json, time
t0 = time.perf_counter()
import hybrid_engine.engine.llm, hybrid_engine.runtime.rank, hybrid_engine.runtime.graphs, hybrid_engine.models.loader
import accelerate.utils, safetensors.torch, tokenizers
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config
try:
    import triton.compiler.compiler, triton.runtime.build
    import triton.backends.nvidia.compiler, triton.backends.nvidia.driver
except ImportError:
    pass
print("RESULT " + json.dumps({"import_s": time.perf_counter() - t0}))
"""


def fill_bytecode(pycache_dir: str, cache_dir: str, timeout_s: float) -> dict:
    """Compile what a load imports into `pycache_dir` (a process that only imports); returns its timing."""
    res = run_child(IMPORTS, [], cache_dir, timeout_s, {"PYTHONPYCACHEPREFIX": pycache_dir})
    print(f"bytecode directory filled: imports took {res['import_s']:.1f} s", flush=True)
    return res


def one(model: str, cache_dir: str, timeout_s: float, compile_workers: str | None = None,
        pycache_dir: str | None = None, evict: bool = False) -> dict:
    extra = {"HYBRID_ENGINE_COMPILE_WORKERS": compile_workers} if compile_workers is not None else {}
    if pycache_dir is not None:
        extra["PYTHONPYCACHEPREFIX"] = pycache_dir
    evicted = evict_page_cache(model) if evict else None
    res = run_child(CHILD, [model], cache_dir, timeout_s, extra)
    if evicted is not None:
        res["evicted_bytes"] = evicted
    print({k: res[k] for k in ("llm_s", "phases_s")}, flush=True)
    return res


def evict_page_cache(path: str) -> int:
    """Drop a checkpoint directory's files from the page cache (posix_fadvise DONTNEED; their pages are clean, so
    no privilege is needed); returns the bytes it asked to drop. A preset name (not a directory) drops nothing."""
    if not os.path.isdir(path) or not hasattr(os, "posix_fadvise"):
        return 0
    total = 0
    for name in os.listdir(path):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--timeout-s", type=float, default=240)
    ap.add_argument("--compile-workers", default=None,
                    help="HYBRID_ENGINE_COMPILE_WORKERS of the children (e.g. auto: the load's kernels compiled on "
                         "parallel threads; default: the engine's)")
    ap.add_argument("--pycache", action="store_true",
                    help="the children keep Python's bytecode in a directory of their own (PYTHONPYCACHEPREFIX, "
                         "filled first by an import-only process), for an installation whose site-packages hold no "
                         ".pyc files and cannot take them, where every process would otherwise compile the modules "
                         "load imports")
    ap.add_argument("--evict-page-cache", action="store_true",
                    help="a checkpoint directory as --model: drop its files from the page cache before each run")
    ap.add_argument("--package", type=Path,
                    help="a directory holding another hybrid_engine package (e.g. a base commit's, for a same-lease "
                         "A/B), put first on the children's path")
    ap.add_argument("--keep-caches", type=Path,
                    help="keep the Triton cache and the bytecode directory in this directory across invocations (a "
                         "later invocation's 'cold' run then finds them filled)")
    ap.add_argument("--results", type=Path, help="a results file whose systems.hybrid gets load_to_ready_s")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.package is not None:
        PACKAGE[:] = [str(args.package.resolve())]
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache, \
            tempfile.TemporaryDirectory(prefix="pycache-") as pycache:
        if args.keep_caches is not None:  # caches kept between invocations: later ones start warm
            cache, pycache = str(args.keep_caches / "triton"), str(args.keep_caches / "pycache")
            filled = os.path.isdir(pycache)
            os.makedirs(cache, exist_ok=True)
            os.makedirs(pycache, exist_ok=True)
        kw = {"compile_workers": args.compile_workers, "pycache_dir": pycache if args.pycache else None,
              "evict": args.evict_page_cache}
        primed = None
        if args.pycache and not (args.keep_caches is not None and filled):
            primed = fill_bytecode(pycache, cache, args.timeout_s)
        cold = one(args.model, cache, args.timeout_s, **kw)
        warm = one(args.model, cache, args.timeout_s, **kw)
    res = {"model": args.model, "package": PACKAGE[0], "compile_workers": args.compile_workers,
           "pycache": args.pycache,
           "page_cache": "evicted before each run" if args.evict_page_cache else "as found",
           "caches": "kept in " + str(args.keep_caches) if args.keep_caches is not None else "fresh",
           "python_dont_write_bytecode": os.environ.get("PYTHONDONTWRITEBYTECODE"),
           "load_to_ready_s": {"cold": round(cold["load_to_ready_s"], 2), "warm": round(warm["load_to_ready_s"], 2)},
           "runs": {"cold": cold, "warm": warm, "bytecode_fill": primed}}
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
