"""`hybrid-engine`: every bad argument is one `error:` line on stderr and exit status 2, sampling values are
checked before a model loads, and `bench` writes nowhere tracked by default."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hybrid_engine
from hybrid_engine import cli
from hybrid_engine.bench import harness

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(hybrid_engine, "LLM", refuse)


def _one_error_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("args", "named"), [
    (["--max-tokens", "0"], "--max-tokens=0 must be an int >= 1"),
    (["--temperature", "-1"], "--temperature=-1.0 must be a number in [0, 100]"),
    (["--top-p", "1.5"], "--top-p=1.5 must be a number in (0, 1]"),
    (["--top-p", "0"], "--top-p=0.0"),
    (["--top-k", "-2"], "--top-k=-2 must be an int >= -1"),
    (["--seed", "-1"], "--seed=-1"),
])
def test_bad_sampling_value_is_one_line_before_the_model_loads(capsys, no_model_load, args, named):
    line = _one_error_line(capsys, cli.main(["generate", "hi", *args]))
    assert named in line


@pytest.mark.parametrize(("args", "named"), [
    (["--max-tokens", "many"], "argument --max-tokens: invalid int value: 'many'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ([], "the following arguments are required: prompt"),
])
def test_argparse_errors_are_one_line_too(capsys, no_model_load, args, named):
    argv = ["generate", *args] if args == [] else ["generate", "hi", *args]
    line = _one_error_line(capsys, cli.main(argv))
    assert named in line and "--help" in line


def test_device_cuda_without_a_gpu(capsys, no_model_load, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _one_error_line(capsys, cli.main(["generate", "hi", "--device", "cuda"]))
    assert "--device=cuda" in line and "no CUDA GPU" in line


def test_missing_model_path(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    line = _one_error_line(capsys, cli.main(["generate", "hi", "--model", missing]))
    assert f"--model={missing!r} could not be loaded" in line and "neither a preset" in line


def test_empty_prompt(capsys, no_model_load):
    assert "the prompt is empty" in _one_error_line(capsys, cli.main(["generate", ""]))


def test_prompt_the_engine_rejects_after_loading(capsys):
    rc = cli.main(["generate", "hello " * 3000, "--max-tokens", "2", "--model", "tiny-llama"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: ") and "max_model_len" in err.splitlines()[-1]


def test_a_good_run_still_generates(capsys):
    assert cli.main(["generate", "hi", "--max-tokens", "3", "--stream", "--model", "tiny-llama"]) == 0
    captured = capsys.readouterr()
    assert "3 generated tokens" in captured.err and "error" not in captured.err


def test_the_console_process_prints_no_traceback():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "hybrid_engine.cli", "generate", "hi", "--model", "/nope"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")


def test_bench_writes_to_an_untracked_folder_by_default():
    args = harness.parse_args(["--device", "cpu"])
    assert args.out_dir == Path("hybrid-engine-results")
    ignored = subprocess.run(["git", "check-ignore", "-q", "hybrid-engine-results/x.json"], cwd=ROOT)
    assert ignored.returncode == 0, "the default output folder must be ignored by git inside a checkout"


def test_bench_help_points_only_to_files_that_exist(capsys):
    with pytest.raises(SystemExit) as info:
        harness.parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "hybrid-engine-results" in text
    for name in re.findall(r"[\w./-]+\.md\b", text):
        assert (ROOT / name).exists(), f"--help names {name}, which does not exist"
    assert "BENCHMARKS.md" not in text
