"""Loading safetensors checkpoint directories the accelerate way: empty-weights init, one copy of the weights.

The memory test writes a ~1.1 GB float16 Llama checkpoint (random weights, `save_pretrained`) in one subprocess and
loads it with `hybrid_engine.LLM(dir, device="cpu", dtype="float16")` in a fresh one. That process first imports
everything and builds a tiny engine (so every lazy import and allocator arena is in place), reads its peak RSS
(`baseline`), then loads the checkpoint and reads the peak RSS again (`peak`, ru_maxrss). The bound:

    peak <= baseline + 1.3 * checkpoint_bytes

i.e. the load may cost at most 1.3x the weights on top of the interpreter/torch/engine baseline (1.0x is the floor:
the weights must end up in memory once). The numbers are printed (run with -s) and attached to the test report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ~542M parameters: 1.08 GB in float16
BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=16, max_position_embeddings=2048)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

WRITE = r"""
import json, sys, torch
from accelerate import init_empty_weights
from transformers import LlamaConfig, LlamaForCausalLM
shape, out, dtype, shard = json.loads(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4]
config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
with init_empty_weights():
    model = LlamaForCausalLM(config)
model = model.to(dtype).to_empty(device="cpu")  # allocated once, in the target dtype
gen = torch.Generator().manual_seed(0)
noise = torch.randn(1 << 22, generator=gen).mul_(0.05).to(dtype)
with torch.no_grad():  # tiles of one 4M-value draw, each shifted at random: drawing 0.5G values costs seconds
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
            continue
        flat = p.view(-1)
        for start in range(0, flat.numel(), noise.numel()):
            n = min(noise.numel(), flat.numel() - start)
            flat[start:start + n].copy_(noise.roll(int(torch.randint(noise.numel(), (1,), generator=gen)))[:n])
model.config.dtype = dtype
model.save_pretrained(out, max_shard_size=shard)
"""

MEASURE = r"""
import json, resource, sys, time
import psutil, torch
import accelerate, safetensors, transformers
from hybrid_engine import LLM
path, device = sys.argv[1], sys.argv[2]
def peak():  # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
warm = LLM("tiny-llama", device=device, max_model_len=32, capture="off")  # all lazy imports and arenas in place
del warm
baseline, t0 = peak(), time.perf_counter()
llm = LLM(path, device=device, dtype="float16", max_model_len=128, capture="off")
load_s = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
print(json.dumps({"baseline_rss": baseline, "peak_rss": peak(), "rss_after": psutil.Process().memory_info().rss,
                  "load_s": load_s, "weights_bytes": weights, "dtype": str(llm.dtype)}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def write_checkpoint(shape: dict, out: Path, dtype: str = "float16", shard: str = "5GB") -> int:
    """Save a random-weight LlamaForCausalLM with save_pretrained (safetensors) in a subprocess; its bytes."""
    subprocess.run([sys.executable, "-c", WRITE, json.dumps(shape), str(out), dtype, shard], check=True,
                   env=_env(), timeout=600)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_loading_a_1gb_fp16_checkpoint_holds_the_weights_once(tmp_path, record_property, device):
    """Host peak RSS; on "cuda" the weights end on the GPU and the same host bound applies."""
    ckpt = tmp_path / "llama-1gb"
    size = write_checkpoint(BIG, ckpt)
    assert 0.9e9 < size < 1.3e9
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(ckpt), device], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    m["checkpoint_bytes"], m["device"] = size, device
    m["load_cost_x"] = (m["peak_rss"] - m["baseline_rss"]) / size
    m["peak_over_checkpoint_x"] = m["peak_rss"] / size
    record_property("rss", m)
    print(f"\naccelerate-load RSS ({device}):", json.dumps(m))
    assert m["dtype"] == "torch.float16" and abs(m["weights_bytes"] - size) < 0.01 * size
    bound = m["baseline_rss"] + 1.3 * size
    assert m["peak_rss"] <= bound, (
        f"peak RSS {m['peak_rss'] / 2**20:.0f} MiB > baseline {m['baseline_rss'] / 2**20:.0f} MiB + 1.3 x checkpoint "
        f"{size / 2**20:.0f} MiB = {bound / 2**20:.0f} MiB: loading cost {m['load_cost_x']:.2f}x the checkpoint")


# ---------------- small checkpoints: correctness of the directory path (fast) ----------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A float32 tiny Llama saved with save_pretrained in several safetensors shards (index.json), plus the
    tiny-llama tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_engine.models.presets import build_tokenizer

    out = tmp_path_factory.mktemp("tiny-ckpt")
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(out, max_shard_size="100KB")
    build_tokenizer(TINY["vocab_size"]).save_pretrained(out)
    return out


def test_sharded_checkpoint_dir_generates_like_transformers(tiny_checkpoint):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from hybrid_engine import LLM, SamplingParams

    assert (tiny_checkpoint / "model.safetensors.index.json").is_file()
    hf = LlamaForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tok("Hello there")["input_ids"]
    want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]
    llm = LLM(str(tiny_checkpoint), device="cpu", dtype="float32", max_model_len=64)
    got = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=12, temperature=0))[0]
    assert got.outputs[0].token_ids == want.tolist()[:len(got.outputs[0].token_ids)]
    assert len(got.outputs[0].token_ids) == len(want)


def test_pipeline_from_checkpoint_dir_with_device_map_and_dtype(tiny_checkpoint):
    from hybrid_engine import pipeline

    kw = dict(max_new_tokens=10, do_sample=False)
    stock = pipeline("text-generation", model=str(tiny_checkpoint), engine="transformers", device_map="cpu",
                     dtype=torch.float32)
    hybrid = pipeline("text-generation", model=str(tiny_checkpoint), device_map="cpu", dtype=torch.float32,
                      model_kwargs={"max_model_len": 64})
    assert hybrid.model.dtype == torch.float32 and hybrid.device.type == "cpu"
    assert hybrid("Hello there", **kw) == stock("Hello there", **kw)
    assert hybrid.model.name_or_path == str(tiny_checkpoint)
