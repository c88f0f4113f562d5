"""Results file (JSON: the dict harness.run returns, plus ratios), its Markdown table and its plot."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
BASELINE = "transformers_eager"


def add_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Every result also as a ratio to its floor, and to transformers eager in the same run (the stable number)."""
    fl = results["floors"]
    base = results["systems"].get(BASELINE, {})
    for name, res in results["systems"].items():
        if "ttft_ms" not in res:
            continue
        res["ttft_p50_vs_floor"] = {n: _ratio(v.get("p50"), fl["ttft_ms"].get(n)) for n, v in res["ttft_ms"].items()}
        for key in ("tpot_ms", "tpot_streamed_ms"):
            if key in res:
                res[f"{key.removesuffix('_ms')}_p50_vs_floor"] = _ratio(res[key].get("p50"), fl["tpot_ms"])
        if name != BASELINE and "ttft_ms" in base:
            res[f"ttft_p50_vs_{BASELINE}"] = {n: _ratio(v.get("p50"), base["ttft_ms"].get(n, {}).get("p50"))
                                              for n, v in res["ttft_ms"].items()}
            if "tpot_ms" in res and "tpot_ms" in base:
                res[f"tpot_p50_vs_{BASELINE}"] = _ratio(res["tpot_ms"]["p50"], base["tpot_ms"]["p50"])
    return results


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 3)


def _ms(x: Any, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pair(d: dict[str, Any] | None) -> str:
    return "–" if not d else f"{_ms(d.get('p50'))} / {_ms(d.get('p99'))}"


def markdown(results: dict[str, Any], plot_name: str | None = None) -> str:
    """The results table: ms (p50 / p99) per system, the floor row, then the ratios to floors and to eager."""
    fl, lengths = results["floors"], list(results["floors"]["ttft_ms"])
    head = (f"{results['card']} · {results['model']} · {results['dtype']} · torch {results['torch']} · "
            f"transformers {results['transformers']} · triton {results['triton']} · {results['created'][:10]}  \n"
            f"copy {fl['copy_GBps']:.0f} GB/s, GEMM {fl['gemm_TFLOPs']:.3g} TFLOP/s measured at the start · "
            f"`{results['command']}`\n")
    cols = [f"TTFT L={n}" for n in lengths] + ["per token (a)", "per token streamed (b)", "first request TTFT / e2e",
                                               "graph memory"]
    rows = ["| system (ms, p50 / p99) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, res in results["systems"].items():
        if "ttft_ms" not in res:
            rows.append(f"| {name} | " + " | ".join(["–"] * len(cols)) + f" |  <!-- {res.get('error', 'no data')} -->")
            continue
        cells = [_pair(res["ttft_ms"].get(n)) for n in lengths]
        cells += [_pair(res.get("tpot_ms")), _pair(res.get("tpot_streamed_ms")),
                  f"{_ms(res.get('first_request_ttft_ms'), 1)} / {_ms(res.get('first_request_e2e_ms'), 0)}",
                  f"{res['graph_pool_bytes'] / 2**20:.0f} MiB" if "graph_pool_bytes" in res else "–"]
        rows.append(f"| {name}{' ¹' if res.get('error') else ''} | " + " | ".join(cells) + " |")
    rows.append("| floor | " + " | ".join([_ms(fl["ttft_ms"][n]) for n in lengths]
                                          + [_ms(fl["tpot_ms"])] * 2 + ["–", "–"]) + " |")
    ratio_cols = [f"TTFT L={n}" for n in lengths] + ["per token (a)"]
    ratio_rows = ["| p50 as × floor (× eager) | " + " | ".join(ratio_cols) + " |", "|---" * (len(ratio_cols) + 1) + "|"]
    for name, res in results["systems"].items():
        if "ttft_ms" not in res:
            continue
        vs_e = res.get(f"ttft_p50_vs_{BASELINE}", {})
        cells = [_x(res["ttft_p50_vs_floor"].get(n), vs_e.get(n)) for n in lengths]
        cells.append(_x(res.get("tpot_p50_vs_floor"), res.get(f"tpot_p50_vs_{BASELINE}")))
        ratio_rows.append(f"| {name} | " + " | ".join(cells) + " |")
    text_cols = [f"L={n}" for n in lengths]
    text_rows = ["| TTFT incl. tokenization (ms, p50 / p99) | " + " | ".join(text_cols) + " |",
                 "|---" * (len(text_cols) + 1) + "|"]
    text_rows += [f"| {name} | " + " | ".join(_pair(res["ttft_text_ms"].get(n)) for n in lengths) + " |"
                  for name, res in results["systems"].items() if "ttft_text_ms" in res]
    plot = f"\n![TTFT and per-token latency vs prompt length]({plot_name})\n" if plot_name else ""
    notes = [f"¹ {name}: {res['error']}" for name, res in results["systems"].items()
             if res.get("error") and "ttft_ms" in res]
    tables = ["\n".join(rows) + "".join(f"\n\n{n}" for n in notes), "\n".join(ratio_rows), "\n".join(text_rows)]
    return head + "\n" + "\n\n".join(tables) + "\n" + plot


def _x(floor_ratio: float | None, eager_ratio: float | None) -> str:
    text = "–" if floor_ratio is None else f"{floor_ratio:.2f}×"
    return text + (f" ({eager_ratio:.2f}×)" if eager_ratio is not None else "")


def plot(results: dict[str, Any], path: Path) -> bool:
    """TTFT and streamed per-token latency (p50 line, p99 band) against prompt length, per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'hybrid-engine[bench]'); no plot written")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths = [int(n) for n in results["floors"]["ttft_ms"]]
    panels = (("ttft_ms", "TTFT (ms)", results["floors"]["ttft_ms"]),
              ("tpot_streamed_by_len_ms", "per-token latency, streamed (ms)",
               {str(n): results["floors"]["tpot_ms"] for n in lengths}))
    for ax, (key, label, floor) in zip(axes, panels):
        for name, res in results["systems"].items():
            points = [(int(n), v["p50"], v["p99"]) for n, v in res.get(key, {}).items() if v.get("n")]
            if points:
                xs, p50, p99 = zip(*points)
                line = ax.plot(xs, p50, marker="o", label=f"{name} p50")[0]
                ax.fill_between(xs, p50, p99, color=line.get_color(), alpha=0.15)
        ax.plot(lengths, [floor[str(n)] for n in lengths], "k--", label="floor")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['card']} · {results['model']} · {results['dtype']} (band: p50 to p99)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_all(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """<stem>.json, <stem>.md and <stem>.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")
    has_plot = plot(results, paths["png"])
    paths["md"].write_text(markdown(results, paths["png"].name if has_plot else None))
    if not has_plot:
        paths.pop("png")
    return paths


def _clean(obj: Any) -> Any:
    """NaN (a point with no samples) becomes null: strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
