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


def bench_json(path: Path, medians_ms: dict[int, float], extra: list[dict] | None = None,
               card: str | None = None) -> Path:
    benches = [{
        "name": f"test_ttft[tiny-llama-L{n}]", "fullname": f"benchmarks/test_bench_latency.py::test_ttft[tiny-llama-L{n}]",
        "params": {"preset": "tiny-llama", "prompt_len": n}, "group": "ttft tiny-llama",
        "extra_info": {"metric": "ttft", "prompt_len": n, "preset": "tiny-llama"},
        "stats": {"median": ms / 1e3, "mean": ms / 1e3, "min": ms / 1e3, "max": ms / 1e3, "rounds": 30},
    } for n, ms in medians_ms.items()]
    machine_info = {"card": card} if card else {}
    path.write_text(json.dumps({"machine_info": machine_info, "benchmarks": benches + (extra or [])}))
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


# ---------------- the baseline stored for the card ----------------

def test_one_file_picks_the_baseline_of_its_card(tmp_path):
    stored = tmp_path / "baselines"
    stored.mkdir()
    bench_json(stored / "gpu-nvidia-h200.json", BASE)
    bench_json(stored / "gpu-nvidia-h100-80gb-hbm3.json", {n: v / 2 for n, v in BASE.items()})
    ok = bench_json(tmp_path / "ok.json", {n: v * 1.08 for n, v in BASE.items()}, card="NVIDIA H200")
    slow = bench_json(tmp_path / "slow.json", {**BASE, 100: 8.0 * 1.25}, card="NVIDIA H200")
    proc = run_cli(ok, "--baseline-dir", stored)
    assert proc.returncode == 0 and "gpu-nvidia-h200.json" in proc.stdout, proc.stdout + proc.stderr
    proc = run_cli(slow, "--baseline-dir", stored)
    assert proc.returncode == 1 and "REGRESSED" in proc.stdout
    proc = run_cli(ok, "--baseline-dir", stored, "--card", "NVIDIA H100 80GB HBM3")  # --card wins over the JSON
    assert proc.returncode == 1 and "gpu-nvidia-h100-80gb-hbm3.json" in proc.stdout


def test_no_baseline_for_the_card_exits_3_and_names_the_file(tmp_path):
    cur = bench_json(tmp_path / "cur.json", BASE, card="NVIDIA B200")
    proc = run_cli(cur, "--baseline-dir", tmp_path)
    assert proc.returncode == gate.NO_BASELINE == 3
    assert "NO BASELINE" in proc.stderr and str(tmp_path / "gpu-nvidia-b200.json") in proc.stderr
    assert "gate: PASS" not in proc.stdout


def test_one_file_without_a_card_is_unusable(tmp_path):
    cur = bench_json(tmp_path / "cur.json", BASE)
    proc = run_cli(cur, "--baseline-dir", tmp_path)
    assert proc.returncode == 2 and "machine_info.card" in proc.stderr


@pytest.mark.parametrize("card", ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "cpu: Intel(R) Xeon(R)"])
def test_which_uses_the_harness_card_slug(card, tmp_path):
    from hybrid_engine.bench.hardware import card_slug

    proc = run_cli("--which", "--card", card, "--baseline-dir", tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.strip() == str(tmp_path / f"gpu-{card_slug(card)}.json")
    cur = bench_json(tmp_path / "cur.json", BASE, card=card)
    assert run_cli("--which", cur, "--baseline-dir", tmp_path).stdout == proc.stdout


def _workflow_step(name_start: str) -> str:
    yaml = pytest.importorskip("yaml")
    steps = yaml.safe_load((ROOT / "ci" / "github-gpu.yml").read_text())["jobs"]["gpu-bench"]["steps"]
    return next(s["run"] for s in steps if s.get("name", "").startswith(name_start))


def test_workflow_gate_step_warns_where_the_card_has_no_baseline(tmp_path):
    script = _workflow_step("TTFT regression gate").replace(".venv/bin/python", sys.executable)
    assert "gpu-llama-2-7b-shape" not in script
    bench_json(tmp_path / "bench-gpu.json", BASE, card="NVIDIA No Such Card")
    (tmp_path / "ci").symlink_to(ROOT / "ci")
    summary = tmp_path / "summary.md"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "GITHUB_STEP_SUMMARY": str(summary)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "::warning title=TTFT gate did not run::" in proc.stdout and "gpu-nvidia-no-such-card.json" in proc.stdout
    assert "did not run" in summary.read_text()


def test_workflow_gate_step_fails_on_a_regression(tmp_path):
    script = _workflow_step("TTFT regression gate").replace(".venv/bin/python", sys.executable)
    card = "NVIDIA Test Card"
    bench_json(tmp_path / "bench-gpu.json", {**BASE, 100: 8.0 * 1.5}, card=card)
    (tmp_path / "ci" / "baselines").mkdir(parents=True)
    (tmp_path / "ci" / "gate.py").write_text(GATE.read_text())  # a copy: its baselines/ folder is the one here
    bench_json(tmp_path / "ci" / "baselines" / "gpu-nvidia-test-card.json", BASE)
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "GITHUB_STEP_SUMMARY": str(tmp_path / "s.md")})
    assert proc.returncode == 1 and "REGRESSED" in proc.stdout, proc.stdout + proc.stderr
