"""ci/gate.py on synthetic pytest-benchmark JSON: passes within tolerance, fails on a regression or a missing
benchmark, prints a table, rejects unusable input."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GATE = ROOT / "ci" / "gate.py"


def _load_gate():
    spec = importlib.util.spec_from_file_location("ci_gate", GATE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ci_gate"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


gate = _load_gate()


def bench_json(path: Path, medians_ms: dict[int, float], extra: list[dict] | None = None) -> Path:
    benches = [{
        "name": f"test_ttft[tiny-llama-L{n}]", "fullname": f"benchmarks/test_bench_latency.py::test_ttft[tiny-llama-L{n}]",
        "params": {"preset": "tiny-llama", "prompt_len": n}, "group": "ttft tiny-llama",
        "extra_info": {"metric": "ttft", "prompt_len": n, "preset": "tiny-llama"},
        "stats": {"median": ms / 1e3, "mean": ms / 1e3, "min": ms / 1e3, "max": ms / 1e3, "rounds": 30},
    } for n, ms in medians_ms.items()]
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches + (extra or [])}))
    return path


BASE = {10: 5.0, 50: 6.0, 100: 8.0, 500: 20.0}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GATE), *map(str, args)], capture_output=True, text=True)


def test_passes_within_tolerance(tmp_path):
    base = bench_json(tmp_path / "base.json", BASE)
    cur = bench_json(tmp_path / "cur.json", {n: v * 1.08 for n, v in BASE.items()})
    proc = run_cli(base, cur, "--tolerance", "0.10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gate: PASS" in proc.stdout
    for n in BASE:
        assert f"test_ttft[tiny-llama-L{n}]" in proc.stdout


def test_fails_on_one_regressed_length_and_names_it(tmp_path):
    base = bench_json(tmp_path / "base.json", BASE)
    cur = bench_json(tmp_path / "cur.json", {**BASE, 100: 8.0 * 1.25})
    proc = run_cli(base, cur, "--tolerance", "0.10")
    assert proc.returncode == 1
    line = next(ln for ln in proc.stdout.splitlines() if "L100" in ln)
    assert "REGRESSED" in line and "+25.0%" in line
    assert sum("REGRESSED" in ln for ln in proc.stdout.splitlines()) == 1
    assert "gate: FAIL" in proc.stdout


def test_per_length_tolerance_and_min_delta(tmp_path):
    base = bench_json(tmp_path / "base.json", BASE)
    cur = bench_json(tmp_path / "cur.json", {**BASE, 10: 5.0 * 1.25})
    assert run_cli(base, cur, "--tolerance", "0.10").returncode == 1
    assert run_cli(base, cur, "--tolerance", "0.10", "--tolerance-for", "10=0.3").returncode == 0
    assert run_cli(base, cur, "--tolerance", "0.10", "--min-delta-ms", "2").returncode == 0  # +1.25 ms only


def test_missing_benchmark_fails_new_one_does_not(tmp_path):
    base = bench_json(tmp_path / "base.json", BASE)
    cur = bench_json(tmp_path / "cur.json", {10: 5.0, 50: 6.0, 100: 8.0})
    proc = run_cli(base, cur)
    assert proc.returncode == 1 and "MISSING" in proc.stdout
    cur2 = bench_json(tmp_path / "cur2.json", {**BASE, 200: 12.0})
    proc2 = run_cli(base, cur2)
    assert proc2.returncode == 0 and "new" in proc2.stdout


def test_only_ttft_benchmarks_are_gated(tmp_path):
    slow_decode = {"name": "test_per_token[tiny-llama-L100]", "fullname": "b.py::test_per_token[tiny-llama-L100]",
                   "params": {"prompt_len": 100}, "extra_info": {"metric": "tpot_streamed", "prompt_len": 100},
                   "stats": {"median": 1.0}}
    base = bench_json(tmp_path / "base.json", BASE, [dict(slow_decode, stats={"median": 0.001})])
    cur = bench_json(tmp_path / "cur.json", BASE, [slow_decode])
    assert run_cli(base, cur).returncode == 0
    assert run_cli(base, cur, "--metric", "tpot_streamed").returncode == 1


def test_faster_is_reported_not_failed():
    rows = gate.compare({"a": (10, 10.0)}, {"a": (10, 5.0)}, 0.1)
    assert rows[0].verdict == "faster" and not gate.failed(rows)


@pytest.mark.parametrize("content", ["not json", json.dumps({"no": "benchmarks"})])
def test_unusable_input_exits_2(tmp_path, content):
    base = bench_json(tmp_path / "base.json", BASE)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    proc = run_cli(base, bad)
    assert proc.returncode == 2 and "not a pytest-benchmark JSON" in proc.stderr


def test_baseline_without_ttft_exits_2(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    assert run_cli(empty, empty).returncode == 2
