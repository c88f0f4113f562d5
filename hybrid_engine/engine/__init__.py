"""The engine: the LLM front end, sequences, the scheduler, KV block bookkeeping and the step loop."""
from .llm import LLM, RequestStream

__all__ = ["LLM", "RequestStream"]
