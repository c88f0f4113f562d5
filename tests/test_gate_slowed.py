"""The gates catch a deliberately slowed engine and pass the real one.

- CPU ratio gate (ci/cpu_gate.py, what .ci/run calls): in-process, against the committed ci/cpu_baseline.json.
- pytest-benchmark gate (ci/gate.py, what the GPU workflow calls): the tiny TTFT suite run in a child pytest three
  times: real (baseline), real again, and with LLM.generate delayed by the plugin ci/slow_engine.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cpu_gate = _load("ci_cpu_gate", ROOT / "ci" / "cpu_gate.py")
gate = _load("ci_gate", ROOT / "ci" / "gate.py")


@pytest.fixture(scope="module")
def systems():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as ci/cpu_gate.py does
    hybrid, eager = cpu_gate.build_systems()
    yield hybrid, eager
    hybrid.close()
    torch.set_num_threads(threads)


def _baseline() -> dict:
    return json.loads(cpu_gate.BASELINE.read_text())


def test_cpu_gate_passes_on_the_real_engine(systems):
    ok, table, current = cpu_gate.run_gate(*systems, _baseline(), cpu_gate.DEFAULT_TOLERANCE, rounds=20)
    print(table)
    assert ok, table


def test_cpu_gate_fails_on_a_slowed_engine(systems, monkeypatch):
    hybrid, eager = systems
    ids = list(range(3, 53))
    eager_ms = float(np.median([eager.ttft_ids(ids) for _ in range(5)])) * 1e3
    delay = max(0.02, 2 * eager_ms / 1e3)  # TTFT ratio rises by >= 2: far beyond any tolerance, far above noise
    real_generate = hybrid.llm.generate

    def slowed(*args, **kwargs):
        time.sleep(delay)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(hybrid.llm, "generate", slowed)
    ok, table, current = cpu_gate.run_gate(hybrid, eager, _baseline(), cpu_gate.DEFAULT_TOLERANCE, rounds=5)
    print(table)
    assert not ok
    assert all("REGRESSED" in line for line in table.splitlines() if line.startswith("ttft_"))


def _suite(tmp_path: Path, name: str, slow_s: float | None = None) -> Path:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_bench_latency.py", "-q", "-p", "no:cacheprovider",
           "-k", "test_ttft and (L50 or L200)", "--bench-rounds", "8", f"--benchmark-json={out}"]
    env = dict(os.environ)
    if slow_s is not None:  # the plugin benchmarks/gpu_check.sh's `gate` stage uses on the GPU
        cmd += ["-p", "slow_engine"]
        env["HYBRID_ENGINE_SLOW_S"] = str(slow_s)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "ci"), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_benchmark_gate_fails_on_slowed_engine_and_passes_on_real(tmp_path, capsys):
    base = _suite(tmp_path, "base")
    again = _suite(tmp_path, "again")
    slowed = _suite(tmp_path, "slowed", slow_s=0.3)
    # Absolute CPU medians drift with the machine's load: a +50% and +100 ms bar is crossed by the 300 ms delay
    # and not by the drift between two real runs.
    opts = ["--tolerance", "0.5", "--min-delta-ms", "100"]
    assert gate.main([str(base), str(again), *opts]) == 0
    assert gate.main([str(base), str(slowed), *opts]) == 1
    out = capsys.readouterr().out
    assert out.count("REGRESSED") == 2 and "gate: FAIL (2 of 2)" in out
    assert json.loads(base.read_text())["machine_info"]["card"]  # what the one-file mode picks the baseline by
