#!/usr/bin/env python
"""TTFT regression gate over pytest-benchmark JSON files.

    python ci/gate.py BASELINE.json CURRENT.json [--tolerance 0.10] [--tolerance-for 10=0.15,500=0.08]

Compares the median of every TTFT benchmark (extra_info["metric"] == "ttft", one per preset and prompt length) in
CURRENT with the same benchmark in BASELINE. A benchmark regresses when
    current_median > baseline_median * (1 + tolerance)   and   current_median - baseline_median > --min-delta-ms.
It prints one table row per benchmark and exits 1 on any regression or on a baseline benchmark missing from
CURRENT, 2 on unusable input, 0 otherwise. Benchmarks only in CURRENT are listed as "new" and do not fail.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TOLERANCE = 0.10


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("baseline", type=Path)
    p.add_argument("current", type=Path)
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"allowed median increase as a fraction (default {DEFAULT_TOLERANCE})")
    p.add_argument("--tolerance-for", type=_per_len, default={}, help="per prompt length, e.g. 10=0.15,500=0.08")
    p.add_argument("--min-delta-ms", type=float, default=0.0, help="ignore increases smaller than this")
    p.add_argument("--metric", default="ttft", help='extra_info["metric"] to gate (default ttft)')
    args = p.parse_args(argv)
    try:
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
