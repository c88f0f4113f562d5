"""The repository speaks of the project only: no work-session numbering in file names, docs or code, and results
files named card[-model]-date[-what]."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SESSION_WORD = re.compile(r"session ?[0-9]", re.IGNORECASE)  # pytest's scope="session" has no number after it
RESULT_NAME = re.compile(r"^[a-z0-9-]+-20\d\d-\d\d-\d\d(-[a-z0-9-]+)?\.(json|md|png|txt)$")


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_no_session_numbers_in_file_names():
    assert [f for f in _tracked() if "session" in f.lower()] == []


def test_no_session_numbers_in_tracked_text():
    hits = []
    for name in _tracked():
        path = ROOT / name
        if path.suffix in {".png", ".whl"} or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{name}: {m.group(0)!r}" for m in SESSION_WORD.finditer(text)]
    assert hits == []


def test_results_are_named_card_model_date_what():
    results = [Path(f).name for f in _tracked() if f.startswith("benchmarks/results/")]
    assert results, "benchmarks/results/ is empty"
    assert [n for n in results if not RESULT_NAME.match(n)] == []


def test_benchmark_results_start_with_their_own_card_model_and_date():
    import json

    from hybrid_engine.bench.harness import results_stem

    checked = 0
    for name in _tracked():
        if not (name.startswith("benchmarks/results/") and name.endswith(".json")):
            continue
        data = json.loads((ROOT / name).read_text())
        if isinstance(data, dict) and {"card", "model", "created"} <= data.keys():
            assert Path(name).name.startswith(results_stem(data)), name
            checked += 1
    assert checked >= 1
