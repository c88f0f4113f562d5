"""`hybrid-engine tune`'s end-to-end check of its GEMV entries (kernels/sweeps/verify.py): the table's GEMV families
are kept only when the model measured faster with them, else put back as they were, other families untouched."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid_engine.kernels import tuning
from hybrid_engine.kernels.sweeps import verify

BEFORE = {"device": "NVIDIA Test Card",
          "tables": {"gemv": {"64,64,float16": [4, 64, 4, 1]}, "decode_gemm": {"64,64,float16": [16, 64, 1, 4, 3]}}}


def _after_tune(path: Path, before: dict | None) -> None:
    """What a tuning run leaves: the file as it was, a changed plain GEMV entry, a new folded-norm family and a new
    decode GEMM entry."""
    if before is not None:
        path.write_text(json.dumps(before))
    tuning.save("gemv", {"64,64,float16": (8, 64, 4, 1)}, "NVIDIA Test Card", path)
    tuning.save("gemv_rope_norm", {"96,64,float16": (2, 64, 4, 1)}, "NVIDIA Test Card", path)
    tuning.save("decode_gemm", {"96,64,float16": (32, 64, 1, 4, 3)}, "NVIDIA Test Card", path)


def _fake_tpot(new_ms: float, old_ms: float, calls: list[str]):
    """A TPOT by which table the directory holds: `new_ms` with the run's plain GEMV entry, else `old_ms`."""
    def measure(tuning_dir: Path) -> float:
        files = list(tuning_dir.glob("*.json"))
        tables = json.loads(files[0].read_text())["tables"] if files else {}
        new = tables.get("gemv", {}).get("64,64,float16") == [8, 64, 4, 1]
        calls.append("after" if new else "before")
        return new_ms if new else old_ms
    return measure


@pytest.mark.parametrize("before", [BEFORE, None])
def test_slower_gemv_entries_are_put_back_and_the_rest_stays(tmp_path, before):
    path = tmp_path / "nvidia-test-card.json"
    text = json.dumps(before) if before else None
    _after_tune(path, before)
    assert verify.gemv_changed(path, text)
    calls: list[str] = []
    verdict = verify.verify_gemv(path, text, _fake_tpot(new_ms=1.06, old_ms=1.00, calls=calls))
    assert calls == ["before", "after", "before", "after"]  # alternated, fresh table copies each time
    assert not verdict.kept and verdict.before_ms == 1.00 and verdict.after_ms == 1.06
    assert "not kept" in verdict.line() and "+6.0 %" in verdict.line()
    tables = json.loads(path.read_text())["tables"]
    assert tables.get("gemv") == (before["tables"]["gemv"] if before else None)
    assert "gemv_rope_norm" not in tables  # a family the run added goes
    assert tables["decode_gemm"]["96,64,float16"] == [32, 64, 1, 4, 3]  # other families keep the run's entries
    assert not verify.gemv_changed(path, text)


def test_faster_gemv_entries_are_kept(tmp_path):
    path = tmp_path / "nvidia-test-card.json"
    _after_tune(path, BEFORE)
    after = path.read_text()
    verdict = verify.verify_gemv(path, json.dumps(BEFORE), _fake_tpot(new_ms=0.95, old_ms=1.00, calls=[]))
    assert verdict.kept and "kept" in verdict.line()
    assert path.read_text() == after


def test_the_check_measures_a_real_engine_in_a_fresh_process(tmp_path):
    """The child script serves the model with the given tuning directory and reports a TPOT (CPU, tiny preset)."""
    ms = verify.tpot_ms("tiny-llama", tmp_path, runs=1, tokens=4, timeout_s=300)
    assert 0 < ms < 10_000


def test_the_check_runs_the_gemv_path():
    """The GEMV entries serve batch_invariant=False only: engines on the (invariant) default would not read them."""
    assert 'batch_invariant=False' in verify.CHILD.split("llm = LLM(", 1)[1].split("\n", 1)[0]


def test_a_failing_child_raises_with_its_error(tmp_path):
    with pytest.raises(RuntimeError, match="exited"):
        verify.tpot_ms("no-such-preset-or-path", tmp_path, runs=1, tokens=2, timeout_s=300)


def test_cli_check_puts_the_gemv_families_back_when_it_cannot_run_and_skips_on_request(tmp_path, monkeypatch, capsys):
    import argparse

    from hybrid_engine import tune_cli

    path = tmp_path / "nvidia-test-card.json"
    _after_tune(path, BEFORE)
    after = path.read_text()
    args = argparse.Namespace(model="tiny-llama", dtype=None, tensor_parallel_size=1, verify=False)
    tune_cli._check_gemv(args, path, json.dumps(BEFORE))
    assert path.read_text() == after and "--no-verify" in capsys.readouterr().err

    def broken(*a, **k):
        raise RuntimeError("the TPOT check's process exited 1: out of memory")

    monkeypatch.setattr(verify, "tpot_ms", broken)
    args.verify = True
    tune_cli._check_gemv(args, path, json.dumps(BEFORE))
    assert "could not run" in capsys.readouterr().err
    assert json.loads(path.read_text())["tables"]["gemv"] == BEFORE["tables"]["gemv"]
