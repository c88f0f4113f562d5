"""`HybridLLM`: a LangChain text-completion model running on the hybrid engine."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from ._engine import HybridEngineFields


class HybridLLM(HybridEngineFields, LLM):
    """Text completion on `hybrid_engine.LLM` (prompt in, continuation out).

    Example:
        ```python
        from hybrid_engine import LLM
        from langchain_hybrid import HybridLLM

        llm = HybridLLM(llm=LLM("tiny-llama"), max_tokens=32, temperature=0.0)
        llm.invoke("Once upon a time")
        for chunk in llm.stream("Once upon a time"):
            print(chunk, end="")
        ```
    Per-call options: `max_tokens`, `temperature`, `top_k`, `top_p`, `seed` and `stop` (cut from the output).
    """

    @property
    def _llm_type(self) -> str:
        return "hybrid-engine"

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return self._generate([prompt], stop, run_manager, **kwargs).generations[0][0].text

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        """All prompts in one engine call (batched): `batch()` lands here with the whole list."""
        return self._result(self.llm.generate(list(prompts), self.sampling_params(stop, kwargs)))

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        """All prompts at once through the engine's async API (batched, no thread): `abatch()` lands here."""
        return self._result(await self.llm.agenerate(list(prompts), self.sampling_params(stop, kwargs)))

    def _result(self, outputs: list[Any]) -> LLMResult:
        generations, prompt_tokens, completion_tokens = [], 0, 0
        for out in outputs:
            completion = out.outputs[0]
            generations.append([Generation(text=completion.text,
                                           generation_info={"finish_reason": completion.finish_reason})])
            prompt_tokens += len(out.prompt_token_ids)
            completion_tokens += len(completion.token_ids)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": self.model})

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        deltas = self.llm.stream_deltas(prompt, self.sampling_params(stop, kwargs))
        try:
            for delta in deltas:
                chunk = _chunk(delta)
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            deltas.close()  # a consumer that stops early cancels the request

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        deltas = self.llm.astream_deltas(prompt, self.sampling_params(stop, kwargs))
        try:
            async for delta in deltas:
                chunk = _chunk(delta)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await deltas.aclose()  # a consumer that stops early cancels the request


def _chunk(delta: Any) -> GenerationChunk:
    info = {"finish_reason": delta.finish_reason} if delta.finish_reason is not None else None
    return GenerationChunk(text=delta.text, generation_info=info)
