"""The engine: the LLM and AsyncLLM front ends, sequences, the scheduler, KV block bookkeeping and the step loop."""
from .async_llm import AsyncLLM
from .async_stream import AsyncRequestStream, EngineClosed
from .llm import LLM, RequestStream

__all__ = ["LLM", "AsyncLLM", "RequestStream", "AsyncRequestStream", "EngineClosed"]
