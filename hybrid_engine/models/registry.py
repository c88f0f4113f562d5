"""Maps a Hugging Face `config.architectures` entry to the engine-native implementation."""
from __future__ import annotations

from typing import Any

from .llama import LlamaModel

# architecture -> implementation (all three share one decoder, switched by config flags)
SUPPORTED_ARCHITECTURES: dict[str, type] = {
    "LlamaForCausalLM": LlamaModel,
    "MistralForCausalLM": LlamaModel,
    "Qwen2ForCausalLM": LlamaModel,
}


def resolve_architecture(config: Any) -> type:
    """Return the model class for `config`, or raise ValueError listing what is supported."""
    archs = list(getattr(config, "architectures", None) or [])
    if not archs and getattr(config, "model_type", None) in ("llama", "mistral", "qwen2"):
        archs = [f"{config.model_type.capitalize()}ForCausalLM"]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    raise ValueError(
        f"architectures={archs!r} (model_type={getattr(config, 'model_type', None)!r}) is not supported; "
        f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
    )
