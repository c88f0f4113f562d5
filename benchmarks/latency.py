#!/usr/bin/env python
"""Latency harness; the same as `hybrid-engine bench` (all options: --help). The logic lives in
hybrid_engine/bench/ so that the installed command needs nothing from this folder.

    python benchmarks/latency.py                       # CPU: tiny-llama; GPU: llama-2-7b-shape, all three systems
    python benchmarks/latency.py --quick --out-dir /tmp/bench
"""
import sys

from hybrid_engine.bench import main

if __name__ == "__main__":
    sys.exit(main())
