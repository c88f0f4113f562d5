"""`hybrid-engine bench`: this engine against transformers eager and static-cache `generate`, same weights, same
card, one run. Writes <card>-<model>-<date>.json / .md / .png into --out-dir (default ./hybrid-engine-results).

On a GPU every system runs in its own child process (`--isolate auto`): its memory is gone before the next loads,
and `--system-timeout` bounds it, which is what bounds the static-cache peer's torch.compile time. A child writes
its partial result after every phase, so a timed-out system still reports what it measured.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import hardware, output
from .measure import Plan, Prompts, measure_system
from .systems import SYSTEMS, free, load_system, model_config

logger = logging.getLogger(__name__)
QUICK = dict(lengths=[10, 50, 100], runs=5, gen_tokens=16, tpot_runs=5, stream_runs=1, warmup=1)
CPU = dict(gen_tokens=32, tpot_runs=10, threads=1)
DEFAULT_OUT_DIR = Path("hybrid-engine-results")  # never a tracked folder of a checkout (.gitignore lists it)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hybrid-engine bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="preset name (tiny-llama, llama-2-7b-shape, smollm2-135m-instruct) or a .gguf "
                                   "file (default: tiny-llama on CPU, llama-2-7b-shape on GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--lengths", type=_ints, help="prompt lengths, comma-separated (default 10,50,100,200,500)")
    p.add_argument("--runs", type=int, help="TTFT runs per prompt length after warm-up (default 30)")
    p.add_argument("--gen-tokens", type=int, help="tokens per TPOT request (default 128 on GPU, 32 on CPU)")
    p.add_argument("--tpot-runs", type=int, help="end-to-end TPOT runs, way (a) (default 30 on GPU, 10 on CPU)")
    p.add_argument("--stream-runs", type=int, help="streamed requests per prompt length, way (b) (default 1)")
    p.add_argument("--tpot-prompt-len", type=int, default=100, help="prompt length of the TPOT runs")
    p.add_argument("--systems", type=_names, default=list(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    p.add_argument("--capture", default="idle", choices=["idle", "eager", "off"], help="engine graph policy")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, type=Path,
                   help=f"where the results go (default ./{DEFAULT_OUT_DIR}, a new folder of the working directory)")
    p.add_argument("--quick", action="store_true", help=f"CI smoke run: {QUICK}")
    p.add_argument("--isolate", default="auto", choices=["auto", "on", "off"],
                   help="one child process per system (auto: on for cuda)")
    p.add_argument("--system-timeout", type=float, default=300.0, help="seconds per system in a child process")
    p.add_argument("--settle-s", type=float, default=120.0, help="max wait for pending graph captures")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: 1 on CPU, torch's own on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _fill_defaults(args)
    return args


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: need positive ints")
    return values


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in SYSTEMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown system(s) {bad}; choose from {list(SYSTEMS)}")
    return names


def _fill_defaults(args: argparse.Namespace) -> None:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.model = args.model or ("llama-2-7b-shape" if gpu else "tiny-llama")
    args.dtype = args.dtype or ("float16" if gpu else "float32")
    defaults = dict(lengths=[10, 50, 100, 200, 500], runs=30, gen_tokens=128, tpot_runs=30, stream_runs=1)
    cpu = {} if gpu else CPU  # CPU numbers only feed ratios: shorter decode runs keep the run under 5 minutes
    for key, value in {**defaults, **cpu, **(QUICK if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.warmup = QUICK["warmup"] if args.quick else 2
    if args.gen_tokens < 2 or args.runs < 1:
        raise SystemExit(f"--gen-tokens={args.gen_tokens} must be >= 2 and --runs={args.runs} >= 1")


def plan_of(args: argparse.Namespace) -> Plan:
    return Plan(lengths=args.lengths, runs=args.runs, gen_tokens=args.gen_tokens, tpot_runs=args.tpot_runs,
                stream_runs=args.stream_runs, tpot_prompt_len=args.tpot_prompt_len, warmup=args.warmup,
                settle_s=args.settle_s if args.device == "cuda" else min(args.settle_s, 10.0))


def run_system(name: str, args: argparse.Namespace, checkpoint=lambda r: None, bar: Any = None) -> dict[str, Any]:
    """Load one system, measure it, free it. Errors are reported in the result, not raised."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    plan = plan_of(args)
    res: dict[str, Any] = {}
    system = None
    try:
        system, timings = load_system(name, args.model, dtype, device, args.capture,
                                      max_cache_len=max(args.lengths + [args.tpot_prompt_len]) + args.gen_tokens + 8,
                                      seed=args.seed)
        res.update({k: round(v, 3) for k, v in timings.items()})
        prompts = Prompts(system.tokenizer, _vocab_size(args.model), args.seed + 1)
        tick = bar.update if bar is not None else (lambda n: None)
        res.update(measure_system(system, plan, prompts, tick, lambda part: checkpoint({**res, **part})))
    except Exception as exc:  # one system failing must not lose the others
        logger.exception("%s failed", name)
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if system is not None:
            free(system, device)
    checkpoint(res)
    return res


def _vocab_size(model: str) -> int:
    return model_config(model).vocab_size


def _run_child(name: str, argv: list[str], args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, "-m", "hybrid_engine.bench", *_strip(argv), "--systems", name, "--worker-out", str(out)]
        try:
            proc = subprocess.run(cmd, timeout=args.system_timeout)
            error = None if proc.returncode == 0 else f"child process exited with code {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {args.system_timeout:.0f} s (--system-timeout); partial results kept"
        res = json.loads(out.read_text()) if out.exists() else {}
    if error and "error" not in res:
        res["error"] = error
    return res


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the harness dies (e.g. under `timeout`), so no orphan keeps the GPU."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _strip(argv: list[str]) -> list[str]:
    """argv without --systems / --worker-out (the child gets its own)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--systems", "--worker-out"):
            skip = True
        elif not a.startswith(("--systems=", "--worker-out=")):
            out.append(a)
    return out


def run(args: argparse.Namespace, argv: list[str], on_system=lambda results: None) -> dict[str, Any]:
    """Measure floors, then every system (calling on_system(results) after each); returns the results dict
    (the format output.py writes and reads)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    card = hardware.card_name(device)
    results: dict[str, Any] = {
        "card": card, **hardware.versions(), "model": args.model, "dtype": args.dtype,
        "command": "hybrid-engine bench " + shlex.join(argv), "argv": sys.argv,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": args.device,
        "python": sys.version.split()[0],
        "floors": hardware.measure_floors(device, model_config(args.model), dtype, args.lengths),
        "plan": {k: getattr(args, k) for k in ("lengths", "runs", "gen_tokens", "tpot_runs", "stream_runs",
                                               "tpot_prompt_len", "warmup", "capture", "seed", "threads")},
        "systems": {},
    }
    isolate = args.isolate == "on" or (args.isolate == "auto" and args.device == "cuda")
    plan = plan_of(args)
    from tqdm.auto import tqdm

    with tqdm(total=0 if isolate else plan.requests() * len(args.systems), disable=args.no_progress or isolate,
              desc="bench", unit="req", mininterval=0.5) as bar:
        for name in args.systems:
            t0 = time.perf_counter()
            bar.set_description(name)
            res = _run_child(name, argv, args) if isolate else run_system(name, args, bar=bar)
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            results["systems"][name] = res
            logger.info("%s done in %.1f s", name, res["wall_s"])
            on_system(output.add_ratios(results))
    return output.add_ratios(results)


def _worker(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    _die_with_parent()
    def checkpoint(part: dict[str, Any]) -> None:
        tmp = args.worker_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(output._clean(part)))
        tmp.replace(args.worker_out)

    (name,) = args.systems
    with tqdm(total=plan_of(args).requests(), desc=name, unit="req", disable=args.no_progress,
              mininterval=0.5) as bar:
        res = run_system(name, args, checkpoint, bar)
    return 1 if "error" in res else 0


def _write(results: dict[str, Any], out_dir: Path, t0: float) -> dict[str, Path]:
    """Written after every system too: a run cut short still leaves the systems it finished."""
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    return output.write_all(results, out_dir, results_stem(results))


def results_stem(results: dict[str, Any]) -> str:
    """card-model-date, the name results files go by (a checkpoint path contributes its folder's name)."""
    model = hardware.card_slug(Path(str(results["model"])).name)
    return f"{hardware.card_slug(results['card'])}-{model}-{results['created'][:10]}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybrid-engine bench` and `python -m hybrid_engine.bench`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if args.worker_out is not None:
            return _worker(args)
        t0 = time.perf_counter()
        results = run(args, argv, on_system=lambda partial: _write(partial, args.out_dir, t0))
        paths = _write(results, args.out_dir, t0)
    finally:
        torch.set_num_threads(threads)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()) + f" in {results['wall_s']:.0f} s")
    failed = [n for n, r in results["systems"].items() if "error" in r]
    if failed:
        print(f"systems with errors: {failed}", file=sys.stderr)
    return 1 if failed else 0
