"""Latency benchmark harness (`hybrid-engine bench`, `python -m hybrid_engine.bench`). See harness.py (the run),
measure.py (the definitions) and output.py (the files): TTFT / TPOT p50 and p99 of this engine and of transformers eager and static-cache `generate` on
the same weights, floors from the card's measured copy bandwidth and GEMM rate, JSON + Markdown + PNG output."""
from __future__ import annotations

from .harness import main

__all__ = ["main"]
