"""Tuned kernel configurations per card: JSON tables shipped with the package and a user cache that sweeps write.

A table file is named by the card (`nvidia-h200.json`) and holds, per kernel family ("decode_gemm",
"cached_attention", ...), entries keyed by the shape and dtype they were measured for, e.g. "4096,4096,float16",
plus the Triton version they were measured with. Lookups read the user cache first ($HYBRID_ENGINE_TUNING_DIR, else
~/.cache/hybrid_engine/tuning), then the package's `tuning/` folder; a card or shape in neither falls back to the
kernel's own default derived from the shape. The sweeps (kernels/sweeps/, run for a model's shapes by
`hybrid-engine tune` and for LLaMA-2-7B's by benchmarks/decode_gemm_bench.py and benchmarks/cached_attn_sweep.py)
write their choices with `save`, so a process started afterwards on the same machine uses them without a code
change; copy the file into `hybrid_engine/kernels/tuning/` to ship it.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).with_name("tuning")


def device_slug(name: str) -> str:
    """A card's name as a file stem: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def user_dir() -> Path:
    env = os.environ.get("HYBRID_ENGINE_TUNING_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hybrid_engine" / "tuning"


def shape_key(*dims: int, dtype: torch.dtype | str) -> str:
    """"N,K,float16": the key of an entry measured for these dims and dtype."""
    return ",".join([*(str(int(d)) for d in dims), str(dtype).removeprefix("torch.")])


@functools.lru_cache(maxsize=None)
def _tables(slug: str) -> dict[str, dict[str, Any]]:
    """Every family's entries for one card: the package's file, then the user's over it."""
    merged: dict[str, dict[str, Any]] = {}
    for path in (PACKAGE_DIR / f"{slug}.json", user_dir() / f"{slug}.json"):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            logger.warning("tuning table %s ignored: %s", path, exc)
            continue
        for family, entries in data.get("tables", {}).items():
            merged.setdefault(family, {}).update(entries)
    return merged


def lookup(family: str, key: str, device: torch.device) -> list[int] | None:
    """The tuned entry for `key` in `family` on `device`'s card, or None (CPU, untuned card or shape)."""
    entry = entries(family, device).get(key)
    return list(entry) if entry is not None else None


def entries(family: str, device: torch.device) -> dict[str, list[int]]:
    """Every tuned entry of `family` on `device`'s card (empty on the CPU or an untuned card)."""
    if device.type != "cuda":
        return {}
    return dict(_tables(device_slug(torch.cuda.get_device_name(device))).get(family, {}))


def save(family: str, entries: dict[str, list[int]], device_name: str, path: Path | None = None) -> Path:
    """Merge `entries` into the user cache's table for `device_name` (or into `path`), written atomically."""
    path = path or user_dir() / f"{device_slug(device_name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    try:
        import triton

        data["triton"] = triton.__version__
    except ImportError:
        pass
    data["device"] = device_name
    data.setdefault("tables", {}).setdefault(family, {}).update({k: list(v) for k, v in entries.items()})
    return _write(path, data)


def restore_families(path: Path, before: str | None, families: tuple[str, ...]) -> Path:
    """Put `families` of the table file at `path` back as they were in `before` (the file's earlier text; None or
    a family missing there: the family is removed), leaving its other families as they are; written atomically."""
    data = json.loads(path.read_text())
    old = json.loads(before).get("tables", {}) if before else {}
    tables = data.setdefault("tables", {})
    for family in families:
        if family in old:
            tables[family] = old[family]
        else:
            tables.pop(family, None)
    return _write(path, data)


def _write(path: Path, data: dict[str, Any]) -> Path:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(f.name, path)
    _tables.cache_clear()
    return path
