"""End-to-end check of a tuning run's one-row GEMV choices: the model's batch-1 TPOT with the card's table as it
was before the run and as the run left it, each in a fresh process, alternated (before, after, before, after).

Why: the GEMV sweep times each kernel alone, twenty calls of it back to back. In a decode step every kernel follows
a different one under programmatic dependent launch (which cuBLAS takes no part in), so a config that wins alone
can lose in the step. On the H200, tables the sweep chose made the Llama-3.2-1B shape 6 % slower at batch 1
(0.934 -> 0.992 ms) and the SmolLM2-135M shape 1.6 % slower. `hybrid-engine tune` therefore keeps its new GEMV
entries only when this check measures the model faster with them, and puts the GEMV families back otherwise. The
engines run with `batch_invariant=False`: the GEMVs serve that path only (the default decode is batch-invariant).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import gemv, tuning

GEMV_FAMILIES = (*gemv.FAMILIES.values(), *gemv.NORM_FAMILIES.values())
PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding hybrid_engine/

CHILD = """
import json, statistics, sys
from hybrid_engine import LLM, SamplingParams
model, dtype, runs, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = LLM(model, dtype=dtype, capture="eager", batch_invariant=False)  # the GEMVs: the path the entries serve
sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
ids = {"prompt_token_ids": list(range(3, 35))}
for _ in range(2):
    llm.generate(ids, sp)
tpots = [llm.generate(ids, sp)[0].metrics.tpot_s for _ in range(runs)]
print("RESULT " + json.dumps({"tpot_ms": statistics.median(tpots) * 1e3}))
llm.close()
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    """before_ms / after_ms: median batch-1 TPOT with the table before / after the run; `kept`: the new GEMV entries
    stay (else they were put back)."""

    before_ms: float
    after_ms: float

    @property
    def kept(self) -> bool:
        return self.after_ms < self.before_ms

    def line(self) -> str:
        change = (self.after_ms / self.before_ms - 1) * 100
        what = "kept" if self.kept else "not kept: the GEMV families are back as they were"
        return (f"[hybrid-engine] check in the model's decode step: batch-1 TPOT {self.before_ms:.4f} ms with the "
                f"table before, {self.after_ms:.4f} ms after ({change:+.1f} %): the new GEMV entries are {what}")


def tpot_ms(model: str, tuning_dir: Path, dtype: str = "auto", runs: int = 5, tokens: int = 64,
            timeout_s: float = 600.0) -> float:
    """Median batch-1 TPOT (ms) of `model` in a fresh process reading its tuning table from `tuning_dir`."""
    env = {**os.environ, "HYBRID_ENGINE_TUNING_DIR": str(tuning_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", CHILD, model, dtype, str(runs), str(tokens)], capture_output=True,
                          text=True, env=env, timeout=timeout_s)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the TPOT check's process exited {proc.returncode}: {proc.stderr[-1500:]}")
    return float(json.loads(line[7:])["tpot_ms"])


def gemv_changed(table: Path, before: str | None) -> bool:
    """Whether the run changed any GEMV family of the table file at `table` (earlier text: `before`)."""
    new = json.loads(table.read_text()).get("tables", {}) if table.exists() else {}
    old = json.loads(before).get("tables", {}) if before else {}
    return any(new.get(f) != old.get(f) for f in GEMV_FAMILIES)


def verify_gemv(table: Path, before: str | None, measure: Callable[[Path], float], rounds: int = 2) -> Verdict:
    """Measure with the table file's earlier text (`before`; None: no file) and with its present one, `rounds`
    times each, alternated; keep the new GEMV entries only if the median after is below the median before, else
    restore the GEMV families (`tuning.restore_families`). `measure(dir)` gives a TPOT with `dir` as the tuning
    directory (`tpot_ms` on a GPU, a fake in tests)."""
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"before": Path(tmp) / "before", "after": Path(tmp) / "after"}
        for d in dirs.values():
            d.mkdir()
        if before:
            (dirs["before"] / table.name).write_text(before)
        (dirs["after"] / table.name).write_text(table.read_text())
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(rounds):
            for arm in ("before", "after"):
                times[arm].append(measure(dirs[arm]))
    verdict = Verdict(statistics.median(times["before"]), statistics.median(times["after"]))
    if not verdict.kept:
        tuning.restore_families(table, before, GEMV_FAMILIES)
    return verdict
