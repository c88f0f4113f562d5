"""LangChain integration for hybrid_engine: `HybridLLM` (text completion) and `ChatHybrid` (chat)."""
from langchain_hybrid.chat_models import ChatHybrid
from langchain_hybrid.llms import HybridLLM

__all__ = ["ChatHybrid", "HybridLLM"]
__version__ = "0.1.0"
