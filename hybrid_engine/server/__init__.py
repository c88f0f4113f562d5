"""OpenAI-compatible HTTP server (FastAPI + uvicorn, SSE, Prometheus metrics): `hybrid-engine serve` or
`python -m hybrid_engine.server`. Needs the `server` extra."""
from .app import build_parser, create_app, main

__all__ = ["build_parser", "create_app", "main"]
