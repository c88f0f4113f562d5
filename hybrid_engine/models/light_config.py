"""A model's config read without importing transformers, so that load can start on the weights at once.

Importing transformers' config and tokenizer classes costs seconds of every load (~6 s on the H200 machines with
compiled bytecode; it pulls in generation utilities, torch's dynamo and any installed scikit-learn). What building
the native model needs (shapes, rope, position limit, architecture) is a handful of config.json fields. This module
reads them with transformers' own defaults for the Llama-family classes (LlamaConfig, MistralConfig, Qwen2Config),
for plain rope only; anything else returns None and load reads the config through transformers as before.

The loader then imports transformers on a background thread while the weights load and the kernels compile, and
checks, once that thread is done, that transformers' config gives the same model (`check_same_model`).
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

from .llama import ModelArgs
from .registry import resolve_architecture

# transformers' class defaults (5.x) for the fields the native model reads, per model_type
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, head_dim=None,
                  initializer_range=0.02, bos_token_id=1, eos_token_id=2),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=None, sliding_window=4096,
                    initializer_range=0.02, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=None, use_sliding_window=False,
                  sliding_window=4096, initializer_range=0.02, bos_token_id=None, eos_token_id=None),
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DEFAULT_ROPE_THETA = 10000.0


def light_config(fields: dict[str, Any]) -> SimpleNamespace | None:
    """The config of `fields` (a config.json's content) as transformers' class for its model_type would resolve the
    native model's fields, or None where this module does not know the answer (another model_type, a scaled rope)."""
    model_type = fields.get("model_type", "llama")
    if model_type not in _DEFAULTS:
        return None
    rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    cfg = {**_DEFAULTS[model_type], **fields, "model_type": model_type}
    heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // heads
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = heads
    if model_type == "qwen2" and not cfg.get("use_sliding_window"):
        cfg["sliding_window"] = None
    theta = rope.get("rope_theta", fields.get("rope_theta", DEFAULT_ROPE_THETA))
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
    cfg.pop("rope_scaling", None)
    cfg.setdefault("architectures", [_ARCHITECTURES[model_type]])
    return SimpleNamespace(**cfg)


def read_light_config(path: str) -> SimpleNamespace | None:
    """light_config of a checkpoint directory's config.json; None where it is missing or unreadable (transformers
    then reads it and reports what is wrong)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            fields = json.load(f)
    except (OSError, ValueError):
        return None
    return light_config(fields) if isinstance(fields, dict) else None


def model_fields(cfg: Any) -> dict[str, Any]:
    """What the native model is built from, as the loader reads it from either config: shapes, rope, the position
    limit and the architecture."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    window = getattr(cfg, "sliding_window", None)
    return {"args": ModelArgs.from_hf(cfg), "architecture": resolve_architecture(cfg).__name__,
            "rope_type": rope.get("rope_type", rope.get("type", "default")),
            "rope_theta": float(rope.get("rope_theta", getattr(cfg, "rope_theta", DEFAULT_ROPE_THETA))),
            "max_position_embeddings": cfg.max_position_embeddings,
            "sliding_window": window if window and getattr(cfg, "use_sliding_window", True) else None}


def check_same_model(light: Any, full: Any, source: str) -> None:
    """Raise ValueError naming each field where the light config and transformers' config of `source` build
    different models (the light reader's defaults are then wrong for this config)."""
    a, b = model_fields(light), model_fields(full)
    diff = [f"{k}: {a[k]!r} (read without transformers) != {b[k]!r} (transformers)" for k in a if a[k] != b[k]]
    if diff:
        raise ValueError(f"the config of {source!r} reads differently without transformers: " + "; ".join(diff))
