"""A deliberately slowed engine, to show that the TTFT gate fails on it: a pytest plugin that delays every
LLM.generate by $HYBRID_ENGINE_SLOW_S seconds (default 0.3).

    PYTHONPATH=ci:. pytest benchmarks -p slow_engine ...
"""
import os
import time

import hybrid_engine

DELAY_S = float(os.environ.get("HYBRID_ENGINE_SLOW_S", "0.3"))
_generate = hybrid_engine.LLM.generate


def generate(self, *args, **kwargs):
    time.sleep(DELAY_S)
    return _generate(self, *args, **kwargs)


hybrid_engine.LLM.generate = generate
