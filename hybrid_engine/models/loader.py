"""Build the native model from a preset, a checkpoint directory, a GGUF file or an in-memory transformers model.

The native module is created under accelerate's `init_empty_weights` (parameters on the meta device, no memory), then
each parameter is allocated once on the target device and filled tensor by tensor: from safetensors files opened
lazily with `safe_open`, from a GGUF file dequantized tensor by tensor (`gguf.py`), or from a `PreTrainedModel`'s
state dict. q/k/v and gate/up are written into their fused buffers as they arrive, so a checkpoint is never held
twice.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from ..distributed.sharding import slice_bounds, split_of, take_shard
from ..errors import ModelLoadError
from . import gguf
from .llama import LlamaModel, ModelArgs, rope_cos_sin_cache
from .presets import GGUF_PRESETS, PRESETS, build_hf_model, build_tokenizer, packaged_gguf, preset_config
from .registry import resolve_architecture

logger = logging.getLogger(__name__)

_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)$")
_NORM_RE = re.compile(r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")


@dataclass(slots=True)
class LoadedModel:
    model: LlamaModel
    hf_config: Any
    tokenizer: Any
    source: str
    max_model_len: int = 0


def load(source: Any, tokenizer: Any, dtype: torch.dtype | None, device: torch.device, max_model_len: int | None,
         seed: int, gguf_file: str | None = None, tp: tuple[int, int] = (0, 1),
         need_tokenizer: bool = True) -> LoadedModel:
    """Load a preset name, checkpoint directory, GGUF file (or directory + `gguf_file`) or PreTrainedModel; decide
    max_model_len from its config. tp = (rank, size): build and fill only this tensor-parallel rank's shard.
    need_tokenizer=False (tensor-parallel workers) skips reading a GGUF file's tokenizer."""
    if isinstance(source, str) and source in GGUF_PRESETS:
        if gguf_file is not None:
            raise ValueError(f"gguf_file={gguf_file!r} cannot be combined with the preset {source!r}")
        source = packaged_gguf(source)
    path = gguf.gguf_path(source, gguf_file)
    if path is not None:
        return load_gguf(path, tokenizer, dtype, device, max_model_len, tp, need_tokenizer)
    if isinstance(source, str) and source in PRESETS:
        hf_config = preset_config(source)
    elif isinstance(source, str):
        hf_config = None  # read from the directory below
    elif hasattr(source, "config") and hasattr(source, "state_dict"):
        hf_config = source.config
    else:
        raise ValueError(f"model={source!r} must be a preset name {_preset_names()}, a checkpoint directory, a "
                         ".gguf file or a transformers PreTrainedModel")
    if isinstance(tokenizer, str):
        tokenizer = _load_tokenizer(tokenizer)
    if hf_config is None:
        hf_config = _read_config(source)
    resolve_architecture(hf_config)
    max_len = resolve_max_model_len(hf_config, max_model_len)
    if isinstance(source, str) and source in PRESETS:
        loaded = load_preset(source, dtype, device, max_len + 1, seed, tokenizer, tp)
    elif isinstance(source, str):
        loaded = load_checkpoint_dir(source, hf_config, dtype, device, max_len + 1, tokenizer, tp)
    else:
        loaded = load_hf_model(source, dtype, device, max_len + 1, tokenizer, tp)
    loaded.max_model_len = max_len
    return loaded


def resolve_max_model_len(hf_config: Any, requested: int | None) -> int:
    limit = hf_config.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        limit = min(limit, window)  # beyond the window the model would need sliding-window attention
    if requested is None:
        return min(limit, 4096)
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds the model's limit of {limit} positions")
    return requested


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


def read_model_config(model: str) -> Any:
    """The transformers config of a preset name, checkpoint directory or .gguf file, read without any weight (a GGUF
    file's from its metadata, which needs the `gguf` package); ModelLoadError / ValueError name what is wrong."""
    if model in GGUF_PRESETS:
        model = packaged_gguf(model)
    if gguf.is_gguf_file(model):
        gguf.require_gguf()
        return gguf.read_config(model)
    return preset_config(model) if model in PRESETS else _read_config(model)


def _read_config(path: str) -> Any:
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise ModelLoadError(f"model={path!r} is neither a preset ({_preset_names()}), an existing directory nor a "
                             ".gguf file")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ModelLoadError(f"{cfg_file!r} does not exist")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot parse {cfg_file!r}: {exc}") from exc


def _preset_names() -> list[str]:
    return sorted([*PRESETS, *GGUF_PRESETS])


def weight_target(hf_name: str) -> tuple[str, int | None] | None:
    """HF parameter name -> (native parameter name, shard index in a fused weight); None for names to skip."""
    name = hf_name.removeprefix("model.")
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return name, None
    if name == "norm.weight":
        return "norm", None
    if m := _LAYER_RE.match(name):
        layer, proj, kind = m.groups()
        if proj in _FUSED:
            fused, shard = _FUSED[proj]
            return f"layers.{layer}.{fused}.{kind}", shard
        return f"layers.{layer}.{proj}.{kind}", None
    if m := _NORM_RE.match(name):
        return f"layers.{m.group(1)}.{m.group(2)}", None
    return None


def _shard_rows(args: ModelArgs, fused_name: str, shard: int) -> tuple[int, int]:
    sizes = [args.q_size, args.kv_size, args.kv_size] if "qkv_proj" in fused_name else [args.intermediate_size] * 2
    return sum(sizes[:shard]), sizes[shard]


def build_empty(hf_config: Any, max_positions: int, tp: tuple[int, int] = (0, 1)) -> LlamaModel:
    """The native model on the meta device; tp = (rank, size): that tensor-parallel rank's shard of it."""
    from accelerate import init_empty_weights

    cls = resolve_architecture(hf_config)
    args = ModelArgs.from_hf(hf_config).sharded(*tp)
    cos_sin = rope_cos_sin_cache(hf_config, args.head_dim, max_positions)
    with init_empty_weights():
        return cls(args, cos_sin)


@torch.no_grad()
def materialize(model: LlamaModel, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                device: torch.device) -> None:
    """Allocate every parameter once on `device` and fill it from (hf_name, tensor) pairs."""
    from accelerate.utils import set_module_tensor_to_device

    params = dict(model.named_parameters())
    filled: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int | None]] = set()
    for hf_name, tensor in tensors:
        target = weight_target(hf_name)
        if target is None:
            continue
        name, shard = target
        if name not in params:
            raise ModelLoadError(f"checkpoint tensor {hf_name!r} has no place in the model (expected {name!r})")
        tensor = take_shard(model.args, name, shard, tensor)
        buf = filled.get(name)
        if buf is None:
            buf = filled[name] = torch.empty(params[name].shape, dtype=dtype, device=device)
        dest = buf if shard is None else buf.narrow(0, *_shard_rows(model.args, name, shard))
        if dest.shape != tensor.shape:
            raise ModelLoadError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
        dest.copy_(tensor)
        seen.add((name, shard))
    if model.args.tie_word_embeddings:
        seen.add(("lm_head.weight", None))
        filled.pop("lm_head.weight", None)
    _check_complete(model, seen)
    for name, buf in filled.items():
        set_module_tensor_to_device(model, name, device, value=buf, dtype=dtype)
    model.cos_sin_cache = model.cos_sin_cache.to(device)
    model.tie_weights()
    model.requires_grad_(False)


def _check_complete(model: LlamaModel, seen: set[tuple[str, int | None]]) -> None:
    missing = []
    for name, _ in model.named_parameters():
        shards = [0, 1, 2] if ".qkv_proj." in name else [0, 1] if ".gate_up_proj." in name else [None]
        missing += [f"{name}[{s}]" if s is not None else name for s in shards if (name, s) not in seen]
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:4]}")


@torch.no_grad()
def random_init(model: LlamaModel, std: float, dtype: torch.dtype, device: torch.device, seed: int) -> None:
    """Random weights drawn directly on `device` (for the benchmark presets: speed does not depend on values). Each
    part of each parameter is drawn whole from its own generator (seed, parameter, part), then cut to this rank's
    shard, so every tensor-parallel size holds the same model."""
    from accelerate.utils import set_module_tensor_to_device

    args = model.args
    for index, (name, p) in enumerate(list(model.named_parameters())):
        if name == "norm" or name.endswith("layernorm"):
            value = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            parts = 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else 1
            pieces = []
            for part in range(parts):
                key = part if parts > 1 else None
                split = split_of(args, name, key)
                shape = list(p.shape)
                if parts > 1:
                    shape[0] = _shard_rows(args, name, part)[1]
                if split is not None:
                    shape[split[0]] = split[1]
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index * 8 + part)
                full = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std).to(dtype)
                pieces.append(take_shard(args, name, key, full))
                del full
            value = pieces[0] if parts == 1 else torch.cat(pieces, dim=0)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
    model.cos_sin_cache = model.cos_sin_cache.to(device)
    model.tie_weights()
    model.requires_grad_(False)


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot read the shard index {index}: {exc}") from exc
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(f"no model.safetensors or model.safetensors.index.json in {path!r} "
                             "(only safetensors checkpoints are supported)")
    full = [os.path.join(path, f) for f in files]
    for f in full:
        if not os.path.isfile(f):
            raise ModelLoadError(f"checkpoint shard {f!r} listed in the index does not exist")
    return full


def _safetensors_tensors(files: list[str], args: ModelArgs | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in the files; under tensor parallelism (`args.tp_size` > 1) only this rank's
    rows or columns of a split weight are read (`sharding.slice_bounds`)."""
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                keys = list(f.keys())
            for key in keys:  # reopen per tensor: only one tensor's pages are mapped at a time (peak RSS)
                with safe_open(file, framework="pt", device="cpu") as f:
                    tensor = _read(f, key, args)
                yield key, tensor
                del tensor
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers / truncated files
            raise ModelLoadError(f"cannot read checkpoint file {file!r}: {exc}") from exc


def _read(f: Any, key: str, args: ModelArgs | None) -> torch.Tensor:
    target = weight_target(key) if args is not None and args.tp_size > 1 else None
    bounds = slice_bounds(args, *target) if target is not None else None  # type: ignore[arg-type]
    if bounds is None:
        return f.get_tensor(key)
    dim, start, stop = bounds
    index = (slice(None),) * dim + (slice(start, stop),)
    return f.get_slice(key)[index]


def load_checkpoint_dir(path: str, hf_config: Any, dtype: torch.dtype | None, device: torch.device,
                        max_positions: int, tokenizer: Any, tp: tuple[int, int] = (0, 1)) -> LoadedModel:
    model = build_empty(hf_config, max_positions, tp)
    dtype = dtype or checkpoint_dtype(hf_config, device)
    materialize(model, _safetensors_tensors(_checkpoint_files(path), model.args), dtype, device)
    if tokenizer is None and _has_tokenizer(path):
        tokenizer = _load_tokenizer(path)
    return LoadedModel(model, hf_config, tokenizer, path)


def load_gguf(path: str, tokenizer: Any, dtype: torch.dtype | None, device: torch.device,
              max_model_len: int | None, tp: tuple[int, int] = (0, 1), need_tokenizer: bool = True) -> LoadedModel:
    """A GGUF file: check its architecture and tensor types first, then dequantize it tensor by tensor into the
    native model; the tokenizer (with its chat template) comes from the file unless one is passed."""
    reader = gguf.open_reader(path)
    arch = gguf.check_supported(reader, path)
    hf_config = gguf.read_config(path)
    resolve_architecture(hf_config)
    max_len = resolve_max_model_len(hf_config, max_model_len)
    model = build_empty(hf_config, max_len + 1, tp)  # GGUF: each tensor dequantized whole, then cut to the shard
    materialize(model, gguf.hf_tensors(reader, arch, hf_config), dtype or checkpoint_dtype(hf_config, device), device)
    del reader
    if isinstance(tokenizer, str):
        tokenizer = _load_tokenizer(tokenizer)
    if tokenizer is None and need_tokenizer:
        tokenizer = gguf.read_tokenizer(path)
    return LoadedModel(model, hf_config, tokenizer, path, max_len)


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                  "tokenizer_config.json"))


def checkpoint_dtype(hf_config: Any, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def load_hf_model(hf_model: Any, dtype: torch.dtype | None, device: torch.device, max_positions: int,
                  tokenizer: Any, tp: tuple[int, int] = (0, 1)) -> LoadedModel:
    hf_config = hf_model.config
    model = build_empty(hf_config, max_positions, tp)
    dtype = dtype or (hf_model.dtype if device.type != "cpu" else torch.float32)
    state = hf_model.state_dict()
    materialize(model, state.items(), dtype, device)
    return LoadedModel(model, hf_config, tokenizer, type(hf_model).__name__)


def load_preset(name: str, dtype: torch.dtype | None, device: torch.device, max_positions: int, seed: int,
                tokenizer: Any, tp: tuple[int, int] = (0, 1)) -> LoadedModel:
    hf_config = preset_config(name)
    tokenizer = tokenizer or build_tokenizer(hf_config.vocab_size)
    if name == "tiny-llama":  # same weights as presets.build_hf_model("tiny-llama"): parity with transformers
        hf_model, _ = build_hf_model(name, torch.float32, "cpu", seed)
        return LoadedModel(load_hf_model(hf_model, dtype, device, max_positions, tokenizer, tp).model,
                           hf_config, tokenizer, name)
    model = build_empty(hf_config, max_positions, tp)
    random_init(model, hf_config.initializer_range, dtype or torch.float16, device, seed)
    return LoadedModel(model, hf_config, tokenizer, name)
