"""The latency harness (hybrid_engine.bench) and benchmarks/report.py: floors, statistics, prompts, the results
file format, the table, the plot, the README block, and one tiny end-to-end run."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from hybrid_engine.bench import harness, hardware, output
from hybrid_engine.bench.measure import Prompts, summary
from hybrid_engine.bench.systems import StepClock
from hybrid_engine.models.presets import build_hf_model, build_tokenizer, preset_config

ROOT = Path(__file__).resolve().parents[1]
FORMAT_KEYS = {"card", "torch", "transformers", "triton", "model", "dtype", "command", "created", "floors", "systems"}
FLOOR_KEYS = {"copy_GBps", "gemm_TFLOPs", "tpot_ms", "ttft_ms"}
SYSTEM_KEYS = {"ttft_ms", "tpot_ms", "tpot_streamed_ms", "first_request_ttft_ms"}


def test_param_count_matches_transformers_and_the_7b_shape():
    model, _ = build_hf_model("tiny-llama")
    assert hardware.count_params(preset_config("tiny-llama")) == sum(p.numel() for p in model.parameters())
    assert hardware.count_params(preset_config("llama-2-7b-shape")) == 6_738_415_616


def test_floors_reproduce_the_design_numbers():
    fl = hardware.floors(6_738_415_616, 2, 2949.0, 744.0, [10, 100, 500])
    assert fl["tpot_ms"] == pytest.approx(4.57, abs=0.01)
    assert fl["ttft_ms"]["10"] == fl["ttft_ms"]["100"] == fl["tpot_ms"]
    assert fl["ttft_ms"]["500"] == pytest.approx(9.06, abs=0.01)


def test_cpu_measurements_are_positive_and_labelled():
    fl = hardware.measure_floors(torch.device("cpu"), preset_config("tiny-llama"), torch.float32, [10])
    assert fl["copy_GBps"] > 0 and fl["gemm_TFLOPs"] > 0
    assert "CPU" in fl["copy_method"] and hardware.card_name(torch.device("cpu")).startswith("cpu: ")
    assert hardware.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_summary_percentiles():
    s = summary([i / 1e3 for i in range(1, 101)])  # 1..100 ms
    assert s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01) and s["n"] == 100
    assert summary([])["n"] == 0


def test_prompts_are_fresh_ordinary_ids_and_texts_fit():
    tok = build_tokenizer(512)
    prompts = Prompts(tok, 512, seed=0)
    a, b = prompts.ids_of(200), prompts.ids_of(200)
    assert a != b and len(a) == 200
    assert not set(a) & set(tok.all_special_ids) and max(a) < 512
    for n in (10, 100, 500):
        text, count = prompts.text_of(n)
        assert 0 < count <= n and len(tok(text).input_ids) == count


def test_step_clock_spreads_a_multi_token_delta():
    clock = StepClock()
    clock.tokens(1)
    clock.tokens(0)
    clock.tokens(3)
    ttft, gaps, e2e = clock.result(4, "x")
    assert len(gaps) == 3 and gaps[0] == gaps[1] == gaps[2] and e2e >= ttft
    with pytest.raises(RuntimeError, match="expected 5"):
        clock.result(5, "x")


def fake_results(device: str = "cuda", created: str = "2026-11-26T00:00:00+00:00") -> dict:
    fl = hardware.floors(6_738_415_616, 2, 2949.0, 744.0, [10, 500])

    def system(scale: float) -> dict:
        point = {"p50": 5.0 * scale, "p99": 6.0 * scale, "n": 30}
        return {"ttft_ms": {"10": point, "500": dict(point, p50=11.0 * scale)}, "tpot_ms": point,
                "tpot_streamed_ms": point, "tpot_streamed_by_len_ms": {"10": point, "500": point},
                "first_request_ttft_ms": 9.0, "first_request_e2e_ms": 900.0}

    return output.add_ratios({
        "card": "NVIDIA H100 80GB HBM3", "torch": "2", "transformers": "5", "triton": "3", "model": "m",
        "dtype": "float16", "command": "hybrid-engine bench", "created": created, "device": device, "floors": fl,
        "systems": {"hybrid": {**system(1.0), "graph_pool_bytes": 3 << 20}, "transformers_eager": system(4.0),
                    "transformers_static": {"error": "timed out"}}})


def test_ratios_table_and_plot(tmp_path):
    res = fake_results()
    hy = res["systems"]["hybrid"]
    assert hy["ttft_p50_vs_transformers_eager"]["10"] == 0.25
    assert hy["ttft_p50_vs_floor"]["10"] == pytest.approx(5.0 / res["floors"]["tpot_ms"], rel=1e-3)
    assert hy["tpot_p50_vs_floor"] > 1
    paths = output.write_all(res, tmp_path, "card-day")
    md = paths["md"].read_text()
    assert "| hybrid | 5.00 / 6.00 |" in md and "3 MiB" in md and "timed out" in md and "(0.25×)" in md
    assert paths["png"].stat().st_size > 10_000
    assert "¹" not in md  # no system kept partial results
    res["systems"]["transformers_eager"]["error"] = "timed out after 170 s (--system-timeout); partial results kept"
    partial = output.markdown(res)
    assert "| transformers_eager ¹ | 20.00 / 24.00 |" in partial
    assert "¹ transformers_eager: timed out after 170 s" in partial
    assert FORMAT_KEYS <= json.loads(paths["json"].read_text()).keys()


def _load_report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_rewrites_only_the_marked_block_from_the_latest_committed_gpu_run(tmp_path):
    report = _load_report()
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "old-gpu.json").write_text(json.dumps(fake_results("cuda", "2026-01-01T00:00:00+00:00")))
    new = fake_results("cuda", "2026-02-01T00:00:00+00:00")
    new["systems"]["hybrid"]["ttft_ms"]["10"]["p50"] = 4.25
    (results / "new-gpu.json").write_text(json.dumps(new))
    (results / "newest-cpu.json").write_text(json.dumps(fake_results("cpu", "2026-03-01T00:00:00+00:00")))
    (results / "uncommitted.json").write_text(json.dumps(fake_results("cuda", "2027-01-01T00:00:00+00:00")))
    alone = fake_results("cuda", "2026-04-01T00:00:00+00:00")  # newest GPU run, one system: not the table
    alone["systems"] = {"hybrid": alone["systems"]["hybrid"]}
    (results / "hybrid-only.json").write_text(json.dumps(alone))
    (results / "pytest-benchmark.json").write_text(json.dumps({"benchmarks": []}))
    readme = tmp_path / "README.md"
    readme.write_text("# x\nbefore\n<!-- results:start -->\nold table\n<!-- results:end -->\nafter\n")
    subprocess.run([*git, "add", "README.md", "benchmarks/results/old-gpu.json", "benchmarks/results/new-gpu.json",
                    "benchmarks/results/newest-cpu.json", "benchmarks/results/pytest-benchmark.json",
                    "benchmarks/results/hybrid-only.json"], check=True)
    assert report.main(["--readme", str(readme), "--check"]) == 1
    assert report.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n<!-- results:start -->\n") and text.endswith("<!-- results:end -->\nafter\n")
    assert "old table" not in text and "new-gpu.json" in text and "| hybrid | 4.25 / 6.00 |" in text
    assert report.main(["--readme", str(readme), "--check"]) == 0
    readme.write_text("no markers\n")
    assert report.main(["--readme", str(readme)]) == 2


def res_card(path) -> str:
    return json.loads(path.read_text())["card"]


def test_quick_run_end_to_end_on_cpu(tmp_path, capsys):
    argv = ["--device", "cpu", "--lengths", "10,20", "--runs", "3", "--gen-tokens", "4", "--tpot-runs", "2",
            "--stream-runs", "1", "--tpot-prompt-len", "20", "--out-dir", str(tmp_path), "--no-progress"]
    assert harness.main(argv) == 0
    (path,) = tmp_path.glob("cpu-*.json")
    assert path.stem == f"{hardware.card_slug(res_card(path))}-tiny-llama-{path.stem[-10:]}"  # card-model-date
    res = json.loads(path.read_text())
    assert FORMAT_KEYS <= res.keys() and FLOOR_KEYS <= res["floors"].keys()
    assert res["command"].startswith("hybrid-engine bench --device cpu")
    assert set(res["systems"]) == {"hybrid", "transformers_eager", "transformers_static"}
    for name, sys_res in res["systems"].items():
        assert "error" not in sys_res, (name, sys_res)
        assert SYSTEM_KEYS <= sys_res.keys()
        assert set(sys_res["ttft_ms"]) == {"10", "20"}
        assert all(v["n"] == 3 and 0 < v["p50"] <= v["p99"] for v in sys_res["ttft_ms"].values())
        assert sys_res["ttft_text_ms"]["20"]["prompt_tokens_mean"] <= 20
    hy = res["systems"]["hybrid"]
    assert "graph_pool_bytes" in hy and "engine_ttft_ms" in hy and hy["ttft_p50_vs_transformers_eager"]
    assert path.with_suffix(".png").exists() and "| hybrid |" in path.with_suffix(".md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_child_process_timeout_is_reported_not_fatal(tmp_path):
    argv = ["--device", "cpu", "--systems", "transformers_eager", "--isolate", "on", "--system-timeout", "0.5",
            "--lengths", "10", "--runs", "1", "--gen-tokens", "2", "--out-dir", str(tmp_path), "--no-progress"]
    assert harness.main(argv) == 1
    (path,) = tmp_path.glob("*.json")
    assert "timed out" in json.loads(path.read_text())["systems"]["transformers_eager"]["error"]


def test_bad_options_are_rejected():
    with pytest.raises(SystemExit):
        harness.parse_args(["--systems", "vllm"])
    with pytest.raises(SystemExit):
        harness.parse_args(["--lengths", "10,x"])
