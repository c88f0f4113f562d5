#!/usr/bin/env python
"""TTFT regression gate over pytest-benchmark JSON files.

    python ci/gate.py BASELINE.json CURRENT.json [--tolerance 0.10] [--tolerance-for 10=0.15,500=0.08]
    python ci/gate.py CURRENT.json [--card "NVIDIA H200"]    # baseline: ci/baselines/gpu-<card slug>.json
    python ci/gate.py --which [--card "NVIDIA H200" | CURRENT.json]   # print that baseline's path

With one file, the baseline is the one stored for the card that produced CURRENT (--card, else CURRENT's
machine_info["card"], which benchmarks/conftest.py records); where none is stored the gate says so and exits 3.

Compares the median of every TTFT benchmark (extra_info["metric"] == "ttft", one per preset and prompt length) in
CURRENT with the same benchmark in BASELINE. A benchmark regresses when
    current_median > baseline_median * (1 + tolerance)   and   current_median - baseline_median > --min-delta-ms.
It prints one table row per benchmark and exits 1 on any regression or on a baseline benchmark missing from
CURRENT, 2 on unusable input, 3 when no baseline is stored for the card, 0 otherwise. Benchmarks only in CURRENT are listed as "new" and do not fail.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TOLERANCE = 0.10
BASELINES = Path(__file__).resolve().with_name("baselines")
NO_BASELINE = 3


class GateInputError(ValueError):
    pass


@dataclass(slots=True)
class Row:
    name: str
    prompt_len: int | None
    base_ms: float | None
    cur_ms: float | None
    limit: float
    verdict: str  # ok | REGRESSED | MISSING | new | faster


def load_ttft(path: Path, metric: str) -> dict[str, tuple[int | None, float]]:
    """fullname -> (prompt length, median ms) for the benchmarks of `metric` in a pytest-benchmark JSON."""
    try:
        data = json.loads(Path(path).read_text())
        benches = data["benchmarks"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GateInputError(f"{path}: not a pytest-benchmark JSON file ({exc})") from None
    out = {}
    for b in benches:
        info = b.get("extra_info") or {}
        if info.get("metric", _metric_from_name(b.get("name", ""))) != metric:
            continue
        n = info.get("prompt_len", (b.get("params") or {}).get("prompt_len"))
        out[b.get("fullname") or b["name"]] = (int(n) if n is not None else None, b["stats"]["median"] * 1e3)
    return out


def card_slug(card: str) -> str:
    """The rule of hybrid_engine.bench.hardware.card_slug (this script runs without the package)."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"


def baseline_for(card: str, directory: Path = BASELINES) -> Path:
    return directory / f"gpu-{card_slug(card)}.json"


def card_of(path: Path) -> str:
    """machine_info["card"] of a pytest-benchmark JSON."""
    try:
        card = json.loads(Path(path).read_text()).get("machine_info", {}).get("card")
    except (OSError, ValueError, AttributeError) as exc:
        raise GateInputError(f"{path}: not a pytest-benchmark JSON file ({exc})") from None
    if not card:
        raise GateInputError(f"{path} does not say which card produced it (no machine_info.card); pass --card")
    return str(card)


def _metric_from_name(name: str) -> str | None:
    return "ttft" if name.startswith("test_ttft") else None


def tolerance_for(n: int | None, default: float, per_len: dict[int, float]) -> float:
    return per_len.get(n, default) if n is not None else default


def compare(base: dict[str, tuple[int | None, float]], cur: dict[str, tuple[int | None, float]], tolerance: float,
            per_len: dict[int, float] | None = None, min_delta_ms: float = 0.0) -> list[Row]:
    per_len = per_len or {}
    rows = []
    for name, (n, b_ms) in sorted(base.items(), key=lambda kv: (kv[1][0] or 0, kv[0])):
        tol = tolerance_for(n, tolerance, per_len)
        if name not in cur:
            rows.append(Row(name, n, b_ms, None, tol, "MISSING"))
            continue
        c_ms = cur[name][1]
        if c_ms > b_ms * (1 + tol) and c_ms - b_ms > min_delta_ms:
            verdict = "REGRESSED"
        else:
            verdict = "faster" if c_ms < b_ms / (1 + tol) else "ok"
        rows.append(Row(name, n, b_ms, c_ms, tol, verdict))
    rows += [Row(name, n, None, c_ms, tolerance_for(n, tolerance, per_len), "new")
             for name, (n, c_ms) in sorted(cur.items()) if name not in base]
    return rows


def failed(rows: list[Row]) -> bool:
    return any(r.verdict in ("REGRESSED", "MISSING") for r in rows)


def table(rows: list[Row]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    header = ("benchmark", "prompt len", "baseline median ms", "current median ms", "change", "allowed", "verdict")
    body = []
    for r in rows:
        change = "-" if r.base_ms is None or r.cur_ms is None else f"{(r.cur_ms / r.base_ms - 1) * 100:+.1f}%"
        body.append((r.name.split("::")[-1], "-" if r.prompt_len is None else str(r.prompt_len), ms(r.base_ms),
                     ms(r.cur_ms), change, f"+{r.limit * 100:.0f}%", r.verdict))
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _per_len(text: str) -> dict[int, float]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            n, tol = item.split("=")
            out[int(n)] = float(tol)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected LEN=TOLERANCE, e.g. 500=0.08") from None
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="*", metavar="[BASELINE] CURRENT")
    p.add_argument("--card", help="the card whose stored baseline to use (default: CURRENT's machine_info.card)")
    p.add_argument("--baseline-dir", type=Path, default=BASELINES, help=f"stored baselines (default {BASELINES})")
    p.add_argument("--which", action="store_true", help="print the stored baseline's path for --card and exit")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"allowed median increase as a fraction (default {DEFAULT_TOLERANCE})")
    p.add_argument("--tolerance-for", type=_per_len, default={}, help="per prompt length, e.g. 10=0.15,500=0.08")
    p.add_argument("--min-delta-ms", type=float, default=0.0, help="ignore increases smaller than this")
    p.add_argument("--metric", default="ttft", help='extra_info["metric"] to gate (default ttft)')
    return p


def resolve_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """(baseline, current): given, or the stored baseline of the card."""
    if len(args.files) == 2:
        return args.files[0], args.files[1]
    if len(args.files) != 1:
        raise GateInputError(f"expected BASELINE CURRENT or CURRENT, got {len(args.files)} file(s)")
    return baseline_for(args.card or card_of(args.files[0]), args.baseline_dir), args.files[0]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.which:
            if not (args.card or len(args.files) == 1):
                raise GateInputError("--which needs --card or one CURRENT file")
            print(baseline_for(args.card or card_of(args.files[0]), args.baseline_dir))
            return 0
        args.baseline, args.current = resolve_files(args)
        if not args.baseline.exists() and len(args.files) == 1:
            print(f"gate: NO BASELINE for this card: {args.baseline} does not exist; the gate did not run. Store "
                  f"one measured on that card (bash benchmarks/gpu_check.sh gate writes it)", file=sys.stderr)
            return NO_BASELINE
        base, cur = load_ttft(args.baseline, args.metric), load_ttft(args.current, args.metric)
    except GateInputError as exc:
        print(f"gate: {exc}", file=sys.stderr)
        return 2
    if not base:
        print(f"gate: {args.baseline} holds no {args.metric!r} benchmarks", file=sys.stderr)
        return 2
    rows = compare(base, cur, args.tolerance, args.tolerance_for, args.min_delta_ms)
    print(f"{args.metric} median: {args.current} vs baseline {args.baseline}")
    print(table(rows))
    bad = [r for r in rows if r.verdict in ("REGRESSED", "MISSING")]
    print(f"gate: FAIL ({len(bad)} of {len(rows)})" if bad else f"gate: PASS ({len(rows)} benchmarks)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
