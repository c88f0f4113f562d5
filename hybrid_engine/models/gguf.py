"""GGUF checkpoints (llama.cpp's format), read with the `gguf` package and transformers' GGUF support.

The config and tokenizer come from `AutoConfig` / `AutoTokenizer.from_pretrained(dir, gguf_file=...)`. Tensors are
read through `gguf.GGUFReader` (a memory map of the file) and dequantized one at a time with `gguf.dequantize`;
transformers' tensor processor undoes llama.cpp's q/k row permutation and its name map gives each tensor its
Hugging Face name, so the loader's `materialize()` fills the native model as from safetensors. At most one
dequantized float32 tensor is alive beside the model's own weights.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import torch

from ..errors import ModelLoadError, OptionalDependencyError

logger = logging.getLogger(__name__)

# general.architecture values whose transformers config maps onto a supported native model (llama.cpp writes
# Mistral models as "llama")
GGUF_ARCHITECTURES = ("llama", "qwen2")
_INSTALL = "pip install 'hybrid-engine[gguf]' (or: pip install 'gguf>=0.10')"


def is_gguf_file(source: Any) -> bool:
    """Whether `source` names a GGUF file (by its suffix)."""
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(".gguf")


def gguf_path(model: Any, gguf_file: str | None) -> str | None:
    """The GGUF file that `model` (and `gguf_file`) name, or None for other checkpoint formats."""
    if gguf_file is None:
        return os.fspath(model) if is_gguf_file(model) else None
    if not isinstance(gguf_file, str) or not gguf_file:
        raise ValueError(f"gguf_file={gguf_file!r} must be the name of a GGUF file (a non-empty str) or None")
    if not isinstance(model, (str, os.PathLike)) or not os.path.isdir(model):
        raise ValueError(f"gguf_file={gguf_file!r} needs model= to be the directory that holds it; got {model!r}")
    return os.path.join(os.fspath(model), gguf_file)


def require_gguf() -> Any:
    """Import the `gguf` package or raise OptionalDependencyError with the install command."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import gguf
    except ImportError as exc:
        raise OptionalDependencyError(f"reading GGUF checkpoints needs the 'gguf' package; install it with: "
                                      f"{_INSTALL}") from exc
    try:
        found = version("gguf")
    except PackageNotFoundError:
        return gguf  # importable but without metadata (a source checkout): trust it
    if tuple(int(p) for p in found.split(".")[:2] if p.isdigit()) < (0, 10):
        raise OptionalDependencyError(f"gguf {found} is too old to read GGUF checkpoints (need >= 0.10); "
                                      f"upgrade with: {_INSTALL}")
    return gguf


def open_reader(path: str) -> Any:
    """A `gguf.GGUFReader` over `path`; a missing, foreign or truncated file raises ModelLoadError."""
    gguf = require_gguf()
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path!r} does not exist")
    size = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader fails with IndexError / ValueError on a short or foreign file
        raise ModelLoadError(f"cannot read GGUF file {path!r} ({size} bytes): {exc}; the file is truncated or not "
                             "a GGUF file") from exc
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ModelLoadError(f"GGUF file {path!r} is truncated: its tensors need {end} bytes, the file has {size}")
    return reader


def architecture(reader: Any) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError("the GGUF file has no general.architecture field")
    return bytes(field.parts[field.data[0]]).decode()


def check_supported(reader: Any, path: str) -> str:
    """Raise ModelLoadError for an architecture or tensor type the engine cannot load; return the architecture."""
    arch = architecture(reader)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"GGUF file {path!r} has architecture {arch!r}; supported: {list(GGUF_ARCHITECTURES)}")
    allowed = dequantizable_types()
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in allowed})
    if bad:
        raise ModelLoadError(f"GGUF file {path!r} has tensors of type {bad}, which gguf cannot dequantize; "
                             f"supported: {sorted(allowed)}")
    return arch


def dequantizable_types() -> set[str]:
    """Tensor types `gguf.dequantize` handles (F32, F16 and every type with a numpy dequantizer)."""
    from gguf import quants

    traits = getattr(quants, "_type_traits", None)
    if traits is None:  # a gguf without the table: accept every type; dequantize() names the one it lacks
        from gguf import GGMLQuantizationType

        return {t.name for t in GGMLQuantizationType}
    return {"F32", "F16"} | {t.name for t in traits}


def read_config(path: str) -> Any:
    from transformers import AutoConfig

    return _from_gguf(AutoConfig, path, "a model config")


def read_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return _from_gguf(AutoTokenizer, path, "a tokenizer")


def _from_gguf(auto_cls: Any, path: str, what: str) -> Any:
    """transformers' `Auto*.from_pretrained(dir, gguf_file=name)`, its failures as ModelLoadError."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        return auto_cls.from_pretrained(directory, gguf_file=name, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot build {what} from GGUF file {path!r}: {exc}") from exc


def hf_tensors(reader: Any, arch: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every tensor of the file, dequantized one at a time."""
    import numpy as np
    from gguf import dequantize

    name_map, processor = _name_map(arch, hf_config)
    for tensor in reader.tensors:
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}: {exc}") from exc
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=name_map,
                                   parsed_parameters={"tensors": {}, "config": {}})
        if result.name not in name_map:
            logger.debug("skipping GGUF tensor %s (no Hugging Face name)", result.name)
            continue
        weights = np.ascontiguousarray(result.weights)
        if not weights.flags.writeable:  # an F32 tensor is a view of the read-only memory map
            weights = weights.copy()
        yield name_map[result.name], torch.from_numpy(weights)


def _name_map(arch: str, hf_config: Any) -> tuple[dict[str, str], Any]:
    """GGUF -> Hugging Face tensor names (gguf's name table applied to the parameters of a transformers model built
    on the meta device), and transformers' tensor processor for the architecture."""
    from accelerate import init_empty_weights
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers import AutoModelForCausalLM

    try:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
    except ImportError as exc:
        raise OptionalDependencyError("this transformers has no GGUF tensor processors; upgrade it with: "
                                      "pip install -U transformers") from exc
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    arch_id = next(key for key, value in MODEL_ARCH_NAMES.items() if value == arch)
    table = get_tensor_name_map(arch_id, hf_config.num_hidden_layers)
    name_map = {}
    for hf_name, _ in skeleton.named_parameters():
        base, suffix = hf_name.rsplit(".", 1)
        if (gguf_name := table.get_name(base)) is not None:
            name_map[f"{gguf_name}.{suffix}"] = hf_name
    return name_map, TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_config.to_dict())


def transformers_model(path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """transformers' own model and tokenizer for a GGUF file (`from_pretrained(dir, gguf_file=...)`): the
    reference the engine is compared with."""
    from transformers import AutoModelForCausalLM

    reader = open_reader(path)
    check_supported(reader, path)
    del reader
    directory, name = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype, local_files_only=True)
    return model.eval(), read_tokenizer(path)
