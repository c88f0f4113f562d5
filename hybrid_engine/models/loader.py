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
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from ..distributed.sharding import slice_bounds, split_of, take_shard
from ..errors import ModelLoadError
from . import gguf
from .light_config import check_same_model, light_config, read_light_config
from .llama import LlamaModel, ModelArgs, rope_cos_sin_cache
from .presets import (GGUF_PRESETS, PRESETS, build_hf_model, build_tokenizer, packaged_gguf, preset_config,
                      preset_fields, tokenizer_size)
from .registry import resolve_architecture

logger = logging.getLogger(__name__)
# the preset whose weights are transformers' model's own (parity tests), so its load needs transformers first
TRANSFORMERS_WEIGHTS_PRESET = "tiny-llama"

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
    phases_s: dict[str, float] = field(default_factory=dict)  # wall seconds: config, weights, tokenizer
    # transformers' config and the tokenizer, still being made on a background thread (`load_overlapped`);
    # until `finish`, hf_config is the light config and tokenizer None
    pending: Future | None = None
    tokenizer_len: int | None = None  # len(tokenizer) known before it is made; None: wait for it

    def tokenizer_size(self) -> int:
        """len(tokenizer) (0 without one), from what is known where the tokenizer is still being made."""
        if self.pending is not None and self.tokenizer_len is not None:
            return self.tokenizer_len
        self.finish()
        return len(self.tokenizer) if self.tokenizer is not None else 0

    def finish(self) -> None:
        """Wait for the background thread; take transformers' config and the tokenizer, after checking that this
        config builds the model the light one built (ModelLoadError naming what differs)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        hf_config, tokenizer = pending.result()
        try:
            check_same_model(self.hf_config, hf_config, self.source)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        size, vocab = (len(tokenizer) if tokenizer is not None else 0), self.model.args.vocab_size
        if self.tokenizer_len is not None and max(size, vocab) != max(self.tokenizer_len, vocab):
            # the step buffers' grammar bitmasks were sized for the count read before (runtime/runner.mask_words)
            raise ModelLoadError(f"the tokenizer of {self.source!r} has {size} tokens where {self.tokenizer_len} "
                                 "were read before it was made")
        self.hf_config, self.tokenizer = hf_config, tokenizer


def _lap(phases: dict[str, float], name: str, since: float) -> float:
    """Add the seconds since `since` to phases[name]; returns now (the next lap's start)."""
    now = time.perf_counter()
    phases[name] = round(phases.get(name, 0.0) + now - since, 3)
    return now


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
    if isinstance(source, str):
        loaded = load_overlapped(source, tokenizer, dtype, device, max_model_len, seed, tp)
        if loaded is not None:
            return loaded
    if isinstance(source, str) and source in PRESETS:
        hf_config = preset_config(source)
    elif isinstance(source, str):
        hf_config = None  # read from the directory below
    elif hasattr(source, "config") and hasattr(source, "state_dict"):
        hf_config = source.config
    else:
        raise ValueError(f"model={source!r} must be a preset name {_preset_names()}, a checkpoint directory, a "
                         ".gguf file or a transformers PreTrainedModel")
    start, phases = time.perf_counter(), {}
    if isinstance(tokenizer, str):
        tokenizer = _load_tokenizer(tokenizer)
        start = _lap(phases, "tokenizer", start)
    if hf_config is None:
        hf_config = _read_config(source)
    resolve_architecture(hf_config)
    max_len = resolve_max_model_len(hf_config, max_model_len)
    _lap(phases, "config", start)
    if isinstance(source, str) and source in PRESETS:
        loaded = load_preset(source, dtype, device, max_len + 1, seed, tokenizer, tp)
    elif isinstance(source, str):
        loaded = load_checkpoint_dir(source, hf_config, dtype, device, max_len + 1, tokenizer, tp)
    else:
        loaded = load_hf_model(source, dtype, device, max_len + 1, tokenizer, tp)
    loaded.max_model_len = max_len
    for name, seconds in phases.items():
        loaded.phases_s[name] = round(loaded.phases_s.get(name, 0.0) + seconds, 3)
    return loaded


def load_overlapped(source: str, tokenizer: Any, dtype: torch.dtype | None, device: torch.device,
                    max_model_len: int | None, seed: int, tp: tuple[int, int]) -> LoadedModel | None:
    """A preset or checkpoint directory whose config reads without transformers (`light_config`): its weights load
    while a background thread imports transformers and makes its config and the tokenizer; the caller takes them
    with `LoadedModel.finish` (runtime/rank does, after the warm-up). None where the config needs transformers."""
    from ..kernels._triton import env_flag

    if not env_flag("HYBRID_ENGINE_OVERLAP_TRANSFORMERS", "config read without transformers, which loads on a thread",
                    "transformers first") or source == TRANSFORMERS_WEIGHTS_PRESET:
        return None
    preset = source in PRESETS
    light = light_config(preset_fields(source)) if preset else read_light_config(source)
    if light is None:
        return None
    start, phases = time.perf_counter(), {}
    resolve_architecture(light)
    max_len = resolve_max_model_len(light, max_model_len)
    tok_len = _tokenizer_len(source, tokenizer, light.vocab_size)
    if device.type == "cuda":
        _import_main_thread_modules()
    pending: Future = Future()
    threading.Thread(target=_transformers_side, args=(pending, source, tokenizer, light.vocab_size),
                     name="hybrid-engine-transformers", daemon=True).start()
    start = _lap(phases, "config", start)
    model = _load_weights(source, light, dtype, device, max_len + 1, seed, tp)
    _lap(phases, "weights", start)
    return LoadedModel(model, light, None, source, max_len, phases, pending, tok_len)


def _transformers_side(pending: Future, source: str, tokenizer: Any, vocab_size: int) -> None:
    """(transformers' config, the tokenizer) of `source` into `pending` (or the error that stopped them)."""
    try:
        if source in PRESETS:
            hf_config = preset_config(source)
        else:
            hf_config = _read_config(source)
        if isinstance(tokenizer, str):
            tokenizer = _load_tokenizer(tokenizer)
        elif tokenizer is None:
            tokenizer = _default_tokenizer(source, vocab_size)
        pending.set_result((hf_config, tokenizer))
    except BaseException as exc:  # noqa: BLE001 - handed to the loading thread, which raises it
        pending.set_exception(exc)


def _tokenizer_len(source: str, tokenizer: Any, vocab_size: int) -> int | None:
    """len() of the tokenizer load will make for `source`, read before it is made: the preset's built size, or a
    tokenizer.json's vocabulary with its added tokens; None where only making it tells (e.g. tokenizer.model)."""
    if tokenizer is not None and not isinstance(tokenizer, str):
        return len(tokenizer)
    if tokenizer is None and source in PRESETS:
        return tokenizer_size(vocab_size)
    folder = tokenizer if isinstance(tokenizer, str) else source
    if tokenizer is None and not _has_tokenizer(folder):
        return 0
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - unreadable here: transformers reads it (and reports it) on its own
        return None


def _import_main_thread_modules() -> None:
    """Import what this thread needs while the transformers thread runs (the weights' helpers, Triton's
    compiler), so the two never import the same modules at once."""
    import accelerate.utils  # noqa: F401
    import safetensors  # noqa: F401

    try:
        import triton.compiler  # noqa: F401
    except ImportError:  # the torch kernel backend runs without Triton
        pass


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
    start, phases = time.perf_counter(), {}
    model = _load_weights(path, hf_config, dtype, device, max_positions, 0, tp)
    start = _lap(phases, "weights", start)
    if tokenizer is None and _has_tokenizer(path):
        tokenizer = _load_tokenizer(path)
        _lap(phases, "tokenizer", start)
    return LoadedModel(model, hf_config, tokenizer, path, phases_s=phases)


def _load_weights(source: str, config: Any, dtype: torch.dtype | None, device: torch.device, max_positions: int,
                  seed: int, tp: tuple[int, int]) -> LlamaModel:
    """The native model of a preset (random weights drawn on `device`) or a checkpoint directory (its safetensors
    files), built from `config` (transformers' or the light one)."""
    model = build_empty(config, max_positions, tp)
    if source in PRESETS:
        random_init(model, config.initializer_range, dtype or torch.float16, device, seed)
    else:
        dtype = dtype or checkpoint_dtype(config, device)
        materialize(model, _safetensors_tensors(_checkpoint_files(source), model.args), dtype, device)
    return model


def _default_tokenizer(source: str, vocab_size: int) -> Any:
    """The tokenizer a preset or checkpoint directory comes with (None: a directory without one)."""
    if source in PRESETS:
        return build_tokenizer(vocab_size)
    return _load_tokenizer(source) if _has_tokenizer(source) else None


def load_gguf(path: str, tokenizer: Any, dtype: torch.dtype | None, device: torch.device,
              max_model_len: int | None, tp: tuple[int, int] = (0, 1), need_tokenizer: bool = True) -> LoadedModel:
    """A GGUF file: check its architecture and tensor types first, then dequantize it tensor by tensor into the
    native model; the tokenizer (with its chat template) comes from the file unless one is passed."""
    start, phases = time.perf_counter(), {}
    reader = gguf.open_reader(path)
    arch = gguf.check_supported(reader, path)
    hf_config = gguf.read_config(path)
    resolve_architecture(hf_config)
    max_len = resolve_max_model_len(hf_config, max_model_len)
    start = _lap(phases, "config", start)
    model = build_empty(hf_config, max_len + 1, tp)  # GGUF: each tensor dequantized whole, then cut to the shard
    materialize(model, gguf.hf_tensors(reader, arch, hf_config), dtype or checkpoint_dtype(hf_config, device), device)
    del reader
    start = _lap(phases, "weights", start)
    if isinstance(tokenizer, str):
        tokenizer = _load_tokenizer(tokenizer)
    if tokenizer is None and need_tokenizer:
        tokenizer = gguf.read_tokenizer(path)
    _lap(phases, "tokenizer", start)
    return LoadedModel(model, hf_config, tokenizer, path, max_len, phases)


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
    start, phases = time.perf_counter(), {}
    hf_config = preset_config(name)
    if tokenizer is None:
        tokenizer = _default_tokenizer(name, hf_config.vocab_size)
        start = _lap(phases, "tokenizer", start)
    if name == TRANSFORMERS_WEIGHTS_PRESET:  # same weights as presets.build_hf_model: parity with transformers
        hf_model, _ = build_hf_model(name, torch.float32, "cpu", seed)
        model = load_hf_model(hf_model, dtype, device, max_positions, tokenizer, tp).model
    else:
        model = _load_weights(name, hf_config, dtype, device, max_positions, seed, tp)
    _lap(phases, "weights", start)
    return LoadedModel(model, hf_config, tokenizer, name, phases_s=phases)
