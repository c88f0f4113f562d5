"""`hybrid-engine tune --model X`: measure the present card for a model's kernel shapes and save the choices into
the card's tuning table (the user cache, which the engine reads at startup on this card)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .cli import _as_flag, _one_line
from .errors import OptionalDependencyError, UsageError

# kernels.sweeps.tune.KERNELS, without importing torch
KERNEL_NAMES = ("gemv", "decode_gemm", "prefill_gemm", "cached_attention")
NORM_FAMILY_NAMES = ("gemv_silu_norm", "gemv_rope_norm")  # kernels.gemv.NORM_FAMILIES' values, likewise


def add_tune_parser(sub: Any) -> None:
    t = sub.add_parser("tune", help="measure this GPU for a model's kernel shapes and save the tuning table",
                       description=__doc__)
    t.add_argument("--model", required=True, help="preset, checkpoint dir or .gguf file (only its config is read)")
    t.add_argument("--tensor-parallel-size", type=int, default=1, help="tune one rank's shard of each weight")
    t.add_argument("--dtype", default=None, choices=["float16", "bfloat16"],
                   help="default: the checkpoint's, as the engine picks it on a GPU")
    t.add_argument("--kernels", default=",".join(KERNEL_NAMES), help=f"comma-separated, of {', '.join(KERNEL_NAMES)}")
    t.add_argument("--quick", action="store_true", help="a smaller decode GEMM grid")
    t.add_argument("--budget-s", type=float, default=300.0,
                   help="time limit in seconds; what is finished by then stays saved (default 300)")
    t.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="after the GEMV sweep, time the model's batch-1 TPOT with the table before and after it (fresh "
                        "processes, alternated) and keep the new GEMV entries only if faster (default: on)")
    t.add_argument("--out", type=Path, default=None,
                   help="table file (or folder, for <card>.json) to write instead of the user cache; copy a table "
                        "into hybrid_engine/kernels/tuning/ to ship it")
    t.set_defaults(func=run_tune)


def _kernels(text: str) -> tuple[str, ...]:
    kernels = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    bad = [k for k in kernels if k not in KERNEL_NAMES]
    if bad or not kernels:
        raise UsageError(f"--kernels={text!r}: choose one or more of {', '.join(KERNEL_NAMES)}, comma-separated")
    return kernels


def _check_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The kernels to tune; every flag checked before anything is read or measured."""
    if not args.budget_s > 0:
        raise UsageError(f"--budget-s={args.budget_s}: must be a number of seconds > 0")
    if args.tensor_parallel_size < 1:
        raise UsageError(f"--tensor-parallel-size={args.tensor_parallel_size}: must be an int >= 1")
    return _kernels(args.kernels)


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UsageError("hybrid-engine tune needs a CUDA GPU: it times kernels on the card that will serve, and "
                         "torch sees none here (run it on that machine)")


def _shapes(args: argparse.Namespace) -> Any:
    from .models.shapes import model_shapes

    try:
        return model_shapes(args.model, args.tensor_parallel_size, args.dtype)
    except (ValueError, OSError, OptionalDependencyError) as exc:  # ModelLoadError is both ValueError and OSError
        message = _one_line(exc)
        if message.startswith("tensor_parallel_size="):
            raise UsageError(f"{_as_flag(message)} (--model={args.model!r})") from None
        raise UsageError(f"--model={args.model!r}: {message}") from None


def _out_path(out: Path | None, device_name: str) -> Path | None:
    from .kernels.tuning import device_slug

    if out is not None and (out.is_dir() or str(out).endswith(("/", "\\"))):
        return out / f"{device_slug(device_name)}.json"
    return out


def run_tune(args: argparse.Namespace) -> int:
    kernels = _check_args(args)
    _require_cuda()
    shapes = _shapes(args)
    import torch
    from tqdm import tqdm

    from .kernels import tuning
    from .kernels._workspace import sm_count
    from .kernels.sweeps.tune import TuneRun, default_workers, steps, tune

    device_name = torch.cuda.get_device_name()
    run = TuneRun(device_name, args.budget_s, args.quick, _out_path(args.out, device_name),
                  sm_count(torch.device("cuda")), default_workers())
    target = run.out or tuning.user_dir() / f"{tuning.device_slug(device_name)}.json"
    before = target.read_text() if target.exists() else None
    print(f"[hybrid-engine] tuning {args.model} (tensor parallel {args.tensor_parallel_size}, "
          f"{str(shapes.dtype).removeprefix('torch.')}) on {device_name}: {', '.join(kernels)} within "
          f"{args.budget_s:.0f} s, saving to {target}", file=sys.stderr)
    with tqdm(total=steps(shapes, kernels), unit="shape", file=sys.stderr) as bar:
        run.progress = bar
        rows = tune(shapes, kernels, run)
    print(format_summary(rows))
    if run.saved_to is None:
        print("[hybrid-engine] nothing was saved: no shape finished (raise --budget-s)", file=sys.stderr)
        return 1
    if "gemv" in kernels:
        _check_gemv(args, run.saved_to, before)
    print(f"[hybrid-engine] wrote {run.saved_to}; engines started on this card read it "
          f"(the decode GEMM table serves the batch-invariant decode, the default)", file=sys.stderr)
    return 0


def _check_gemv(args: argparse.Namespace, table: Path, before: str | None) -> None:
    """The end-to-end check of the run's GEMV entries (kernels/sweeps/verify.py), or why it did not run."""
    import subprocess

    from .kernels import tuning
    from .kernels.sweeps.verify import GEMV_FAMILIES, gemv_changed, tpot_ms, verify_gemv

    if not gemv_changed(table, before):
        return
    if not args.verify:
        print("[hybrid-engine] --no-verify: the new GEMV entries are kept without the check in the model's decode "
              "step", file=sys.stderr)
        return
    if args.tensor_parallel_size > 1:
        print("[hybrid-engine] the check in the model's decode step runs at tensor parallel 1 only: the new GEMV "
              "entries are kept unchecked", file=sys.stderr)
        return
    print("[hybrid-engine] checking the new GEMV entries in the model's decode step (4 fresh engines)...",
          file=sys.stderr)
    try:
        verdict = verify_gemv(table, before, lambda d: tpot_ms(args.model, d, args.dtype or "auto"))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        tuning.restore_families(table, before, GEMV_FAMILIES)
        print(f"[hybrid-engine] the check could not run ({_one_line(exc)[:300]}): the GEMV families are back as they "
              "were (--no-verify keeps new entries unchecked)", file=sys.stderr)
        return
    print(verdict.line(), file=sys.stderr)


def _slashed(values: dict, keys: list) -> str:
    return "/".join(f"{values[k]:.1f}" if k in values else "-" for k in keys)


def format_summary(rows: list[Any]) -> str:
    """One line per table entry: kernel, shape, chosen config, us of the choice and of its baseline (decode GEMM:
    at M = 1/8/32 vs cuBLAS; the prefill plan, its (max M, choice) ranges, at each bucket M vs cuBLAS; the plain GEMV
    at M = 1 vs cuBLAS, the fused GEMVs vs the config used before, and with
    the norm folded in vs the norm kernel apart; cached attention: at each cached start vs the config used before),
    and why nothing was chosen or what was cut short."""
    lines = [f"{'kernel':<17} {'shape':<26} {'chosen config':<22} {'us (chosen)':<40} baseline"]
    for row in rows:
        keys = sorted(set(row.us) | set(row.baseline_us))
        by_m = row.family in ("decode_gemm", "prefill_gemm") or row.family.startswith("gemv")
        cublas = row.family in ("decode_gemm", "gemv", "prefill_gemm")
        before = "apart" if row.family in NORM_FAMILY_NAMES else "before"
        us = f"{'M' if by_m else 'start'} {'/'.join(map(str, keys))}: {_slashed(row.us, keys)}" if row.us else "-"
        base = f"{'cuBLAS' if cublas else before} {_slashed(row.baseline_us, keys)}" if row.baseline_us else "-"
        line = f"{row.family:<17} {row.label:<26} {str(row.config or '-'):<22} {us:<40} {base}"
        lines.append(f"{line}  ({row.note})" if row.note else line)
    return "\n".join(lines)
