"""`ChatHybrid`: a LangChain chat model running on the hybrid engine (the tokenizer's chat template applied)."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage,
                                     SystemMessage, ToolMessage)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list

from ._engine import HybridEngineFields

_ROLES: dict[type, str] = {HumanMessage: "user", AIMessage: "assistant", SystemMessage: "system",
                           ToolMessage: "tool"}


class ChatHybrid(HybridEngineFields, BaseChatModel):
    """Chat on `hybrid_engine.LLM`: messages go through the tokenizer's chat template (`llm.encode_chat`).

    Example:
        ```python
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.prompts import ChatPromptTemplate
        from langchain_hybrid import ChatHybrid

        chat = ChatHybrid(model="tiny-llama", engine_kwargs={"device": "cpu"}, max_tokens=32, temperature=0.0)
        msg = chat.invoke("Hello")            # AIMessage; msg.usage_metadata has the token counts
        chain = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{q}")]) | chat | StrOutputParser()
        chain.invoke({"q": "What is a KV cache?"})
        ```
    Per-call options: `max_tokens`, `temperature`, `top_k`, `top_p`, `seed` and `stop` (cut from the output).
    """

    @property
    def _llm_type(self) -> str:
        return "hybrid-engine-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "hybrid_engine"
        return params

    def _prompt_ids(self, messages: list[BaseMessage]) -> dict[str, list[int]]:
        return {"prompt_token_ids": list(self.llm.encode_chat(to_chat_dicts(messages)))}

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[BaseMessage]:
        """LangChain's batch, with up to the engine's max_num_seqs conversations in flight at once (not LangChain's
        default of a few), so that the engine decodes them together; a `max_concurrency` given in config wins."""
        configs = get_config_list(config, len(inputs))
        for cfg in configs:
            cfg.setdefault("max_concurrency", self.llm.config.max_num_seqs)
        return super().batch(inputs, configs, return_exceptions=return_exceptions, **kwargs)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        out = self.llm.generate([self._prompt_ids(messages)], self.sampling_params(stop, kwargs))[0]
        return self._result(out)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        """Through the engine's async API: concurrent `ainvoke`s and `abatch()` are decoded together."""
        out = (await self.llm.agenerate([self._prompt_ids(messages)], self.sampling_params(stop, kwargs)))[0]
        return self._result(out)

    def _result(self, out: Any) -> ChatResult:
        completion = out.outputs[0]
        usage = _usage(len(out.prompt_token_ids), len(completion.token_ids))
        message = AIMessage(content=completion.text, usage_metadata=usage,
                            response_metadata=self._response_metadata(completion.finish_reason))
        generation = ChatGeneration(message=message, generation_info={"finish_reason": completion.finish_reason})
        return ChatResult(generations=[generation], llm_output={"token_usage": dict(usage), "model_name": self.model})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        prompt = self._prompt_ids(messages)
        deltas = self.llm.stream_deltas(prompt, self.sampling_params(stop, kwargs))
        generated = 0
        try:
            for delta in deltas:
                generated += len(delta.token_ids)
                chunk = self._chunk(delta, len(prompt["prompt_token_ids"]), generated)
                if run_manager is not None:
                    run_manager.on_llm_new_token(delta.text, chunk=chunk)
                yield chunk
        finally:
            deltas.close()  # a consumer that stops early cancels the request

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        prompt = self._prompt_ids(messages)
        deltas = self.llm.astream_deltas(prompt, self.sampling_params(stop, kwargs))
        generated = 0
        try:
            async for delta in deltas:
                generated += len(delta.token_ids)
                chunk = self._chunk(delta, len(prompt["prompt_token_ids"]), generated)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(delta.text, chunk=chunk)
                yield chunk
        finally:
            await deltas.aclose()  # a consumer that stops early cancels the request

    def _chunk(self, delta: Any, prompt_tokens: int, generated: int) -> ChatGenerationChunk:
        """One streamed piece; the last carries finish_reason and the token counts (summed once by LangChain)."""
        if delta.finish_reason is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=delta.text))
        message = AIMessageChunk(content=delta.text, usage_metadata=_usage(prompt_tokens, generated),
                                 response_metadata=self._response_metadata(delta.finish_reason),
                                 chunk_position="last")
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": delta.finish_reason})

    def _response_metadata(self, finish_reason: str | None) -> dict[str, Any]:
        return {"model_name": self.model, "finish_reason": finish_reason, "model_provider": "hybrid_engine"}


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> chat-template dicts ({"role", "content"}); only text content is supported."""
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    for message in messages:
        role = message.role if isinstance(message, ChatMessage) else _ROLES.get(type(message))
        if role is None:
            role = next((r for cls, r in _ROLES.items() if isinstance(message, cls)), None)
        if role is None:
            raise ValueError(f"message type {type(message).__name__} is not supported; use Human/AI/System/Tool/"
                             "ChatMessage")
        out.append({"role": role, "content": _text(message)})
    return out


def _text(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block["text"])
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"content block of type {kind!r} is not supported; the engine takes text only")
    return "".join(parts)


def _usage(prompt_tokens: int, generated: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=prompt_tokens, output_tokens=generated, total_tokens=prompt_tokens + generated)
