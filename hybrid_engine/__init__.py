"""hybrid_engine: low-latency LLM inference with CUDA-graph replays, Triton JIT kernels and background capture."""
from .config import EngineConfig
from .engine import LLM, AsyncLLM
from .errors import HybridEngineError, ModelLoadError, OptionalDependencyError
from .outputs import CompletionOutput, RequestMetrics, RequestOutput, StreamDelta
from .sampling_params import SamplingParams
from .structured.params import GuidedDecodingParams

__version__ = "0.1.0"


def pipeline(*args, **kwargs):  # noqa: ANN002, ANN003 - forwards transformers.pipeline's signature
    """`transformers.pipeline`-compatible factory; engine="hybrid" runs generation on this engine."""
    from .adapters.pipeline import pipeline as _pipeline

    return _pipeline(*args, **kwargs)


__all__ = ["LLM", "AsyncLLM", "SamplingParams", "GuidedDecodingParams", "EngineConfig", "RequestOutput", "CompletionOutput", "RequestMetrics",
           "StreamDelta", "HybridEngineError", "ModelLoadError", "OptionalDependencyError", "pipeline"]
