"""AsyncLLM: the asyncio front end of an `LLM` (its `agenerate` / `astream` / `astream_deltas`, under vLLM's
names). Requests are batched with every other request of the engine; see async_stream.py for the driver thread."""
from __future__ import annotations

from typing import Any, AsyncIterator, Sequence as Seq

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .async_stream import AsyncRequestStream
from .llm import LLM


class AsyncLLM:
    """The asyncio front end of an `LLM`: `await generate(...)`, `async for ... in stream(...)`. Pass an LLM, or a
    model and `LLM(...)` keywords to build one. Concurrent requests are batched by the engine.

    >>> engine = AsyncLLM("tiny-llama")
    >>> outs = await engine.generate(["Hello", "Hi"], SamplingParams(max_tokens=8, temperature=0))
    """

    def __init__(self, model: Any = "tiny-llama", **kwargs: Any) -> None:
        if isinstance(model, LLM):
            if kwargs:
                raise ValueError(f"options {sorted(kwargs)} cannot change an already built LLM; pass them to "
                                 "LLM(...) instead")
            self.llm = model
        else:
            self.llm = LLM(model, **kwargs)
        self.driver = self.llm.driver  # one driver thread per engine, whichever front end asks

    def stream_deltas(self, prompt: Any, sampling_params: SamplingParams | None = None) -> AsyncRequestStream:
        """StreamDelta per generated token; validates and submits at once (call it inside a running event loop)."""
        return self.llm.astream_deltas(prompt, sampling_params)

    def stream(self, prompt: Any, sampling_params: SamplingParams | None = None) -> AsyncIterator[str]:
        """Text deltas as tokens are generated; leaving the `async for` early cancels the request."""
        return self.llm.astream(prompt, sampling_params)

    async def generate(self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
                       ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; the prompts run together (batched)."""
        return await self.llm.agenerate(prompts, sampling_params)

    async def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Apply the tokenizer's chat template to `messages` and generate the assistant's reply."""
        ids = self.llm.encode_chat(messages)
        return (await self.generate({"prompt_token_ids": ids}, sampling_params))[0]

    def stats(self) -> dict[str, Any]:
        return self.llm.stats()

    def close(self) -> None:
        """Stop the driver thread; requests still running fail with EngineClosed."""
        self.driver.close()
