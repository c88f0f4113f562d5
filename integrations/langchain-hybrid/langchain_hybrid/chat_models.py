"""`ChatHybrid`: a LangChain chat model running on the hybrid engine (the tokenizer's chat template applied)."""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import get_config_list

from hybrid_engine.tools.plan import ChatPlan

from ._engine import HybridEngineFields
from ._tools import (REPLY_OPTIONS, lc_tool_call_chunks, lc_tool_calls, normalize_tool_choice, openai_tools,
                     structured_output_parts, to_chat_dicts, with_raw)

__all__ = ["ChatHybrid", "to_chat_dicts"]


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
    Per-call options: `max_tokens`, `temperature`, `top_k`, `top_p`, `seed` and `stop` (cut from the output);
    `tools`, `tool_choice`, `parallel_tool_calls` and `response_format` in OpenAI's shapes (set by `bind_tools`
    and `with_structured_output`).
    """

    chat_template: str | None = None
    """A Jinja chat template used instead of the tokenizer's (as `--chat-template` on the server)."""
    tool_call_parser: str = "hermes"
    """Tool-call syntax asked for and parsed: "hermes" (`<tool_call>` tags) or "llama3_json"."""

    @property
    def _llm_type(self) -> str:
        return "hybrid-engine-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "hybrid_engine"
        return params

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, parallel_tool_calls: bool | None = None,
                   **kwargs: Any) -> Runnable[Any, AIMessage]:
        """Offer `tools` (python functions, pydantic models, `@tool`s or OpenAI tool dicts) to the model.

        tool_choice: None/"auto" (the model decides), "none", "required" or "any" (some call, enforced by a
        grammar), or a tool name (that tool, enforced). Calls come back as `AIMessage.tool_calls`, and as
        `tool_call_chunks` when streaming. Bad tools or an unknown tool name raise ValueError here."""
        formatted = openai_tools(tools)
        choice = normalize_tool_choice(tool_choice, formatted)
        ChatPlan.build(formatted, choice, parallel_tool_calls, None, self.tool_call_parser).check()
        options: dict[str, Any] = {"tools": formatted}
        if choice is not None:
            options["tool_choice"] = choice
        if parallel_tool_calls is not None:
            options["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(**options, **kwargs)

    def with_structured_output(self, schema: dict[str, Any] | type, *, method: str = "json_schema",
                               include_raw: bool = False, **kwargs: Any) -> Runnable[Any, Any]:
        """A runnable returning `schema`-shaped output: a pydantic instance for a pydantic model, a dict for a JSON
        schema, TypedDict or OpenAI function/tool.

        method "json_schema" (default): the reply is decoded under the schema (response_format json_schema);
        "function_calling": a forced call to a tool made from the schema; "json_mode": any JSON object.
        include_raw: return {"raw", "parsed", "parsing_error"} instead of raising on a parse failure."""
        if kwargs:
            raise ValueError(f"unsupported with_structured_output option(s) {sorted(kwargs)}")
        bind, parser = structured_output_parts(schema, method)
        llm = self.bind(**bind)
        return with_raw(llm, parser) if include_raw else llm | parser

    def _plan(self, kwargs: dict[str, Any]) -> tuple[ChatPlan, dict[str, Any]]:
        """The call's tools and format (checked), and the remaining (sampling) options."""
        shaping = {name: kwargs[name] for name in REPLY_OPTIONS if name in kwargs}
        rest = {k: v for k, v in kwargs.items() if k not in REPLY_OPTIONS}
        plan = ChatPlan.build(shaping.get("tools"), shaping.get("tool_choice"), shaping.get("parallel_tool_calls"),
                              shaping.get("response_format"), self.tool_call_parser)
        return plan, rest

    def _request(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[dict[str, list[int]], Any, ChatPlan]:
        """Prompt ids, SamplingParams (with the call's constraint) and plan of one call."""
        plan, rest = self._plan(kwargs)
        params = self.sampling_params(stop, rest)
        constraint = plan.constraint()
        if constraint is not None:
            params = dataclasses.replace(params, structured_output=constraint)
        dicts = to_chat_dicts(messages)
        if plan.tools or self.chat_template is not None:
            ids = plan.prompt_ids(self.llm.tokenizer, dicts, self.chat_template)
        else:
            ids = self.llm.encode_chat(dicts)
        return {"prompt_token_ids": list(ids)}, params, plan

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
        prompt, params, plan = self._request(messages, stop, kwargs)
        return self._result(self.llm.generate([prompt], params)[0], plan)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        """Through the engine's async API: concurrent `ainvoke`s and `abatch()` are decoded together."""
        prompt, params, plan = self._request(messages, stop, kwargs)
        return self._result((await self.llm.agenerate([prompt], params))[0], plan)

    def _result(self, out: Any, plan: ChatPlan) -> ChatResult:
        completion = out.outputs[0]
        content, calls = plan.parse(completion.text)
        finish = "tool_calls" if calls else completion.finish_reason
        usage = _usage(len(out.prompt_token_ids), len(completion.token_ids))
        message = AIMessage(content=content or "", tool_calls=lc_tool_calls(calls), usage_metadata=usage,
                            response_metadata=self._response_metadata(finish))
        generation = ChatGeneration(message=message, generation_info={"finish_reason": finish})
        return ChatResult(generations=[generation], llm_output={"token_usage": dict(usage), "model_name": self.model})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        prompt, params, plan = self._request(messages, stop, kwargs)
        deltas = self.llm.stream_deltas(prompt, params)
        chunks = _ChunkMaker(self, plan, len(prompt["prompt_token_ids"]))
        try:
            for delta in deltas:
                chunk = chunks.make(delta)
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            deltas.close()  # a consumer that stops early cancels the request

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        prompt, params, plan = self._request(messages, stop, kwargs)
        deltas = self.llm.astream_deltas(prompt, params)
        chunks = _ChunkMaker(self, plan, len(prompt["prompt_token_ids"]))
        try:
            async for delta in deltas:
                chunk = chunks.make(delta)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await deltas.aclose()  # a consumer that stops early cancels the request

    def _response_metadata(self, finish_reason: str | None) -> dict[str, Any]:
        return {"model_name": self.model, "finish_reason": finish_reason, "model_provider": "hybrid_engine"}


class _ChunkMaker:
    """Engine deltas -> ChatGenerationChunks: text through the plan's stream parser (content and tool-call
    chunks); the last carries finish_reason and the token counts (summed once by LangChain)."""

    def __init__(self, chat: ChatHybrid, plan: ChatPlan, prompt_tokens: int) -> None:
        self.chat, self.parser, self.prompt_tokens, self.generated = chat, plan.stream_parser(), prompt_tokens, 0

    def make(self, delta: Any) -> ChatGenerationChunk:
        self.generated += len(delta.token_ids)
        piece = self.parser.feed(delta.text)
        if delta.finish_reason is None:
            return ChatGenerationChunk(message=AIMessageChunk(
                content=piece.content, tool_call_chunks=lc_tool_call_chunks(piece.tool_calls)))
        end = self.parser.finish()
        finish = "tool_calls" if self.parser.tool_calls else delta.finish_reason
        message = AIMessageChunk(content=piece.content + end.content,
                                 tool_call_chunks=lc_tool_call_chunks(piece.tool_calls + end.tool_calls),
                                 usage_metadata=_usage(self.prompt_tokens, self.generated),
                                 response_metadata=self.chat._response_metadata(finish), chunk_position="last")
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": finish})


def _usage(prompt_tokens: int, generated: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=prompt_tokens, output_tokens=generated, total_tokens=prompt_tokens + generated)
