"""OpenAI wire format for the server: request models (strict types) and response/chunk builders."""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hybrid_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Fields OpenAI defines that this engine accepts but cannot honour when set to a non-default value.
# name -> the values that mean "off" (accepted, nothing to do).
_UNSUPPORTED_UNLESS_DEFAULT: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "functions": (None, []),
    "function_call": (None, "none"),
}


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 err_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.err_type = err_type or _type_for(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


def _type_for(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 404:
        return "not_found_error"
    return "server_error" if status >= 500 else "invalid_request_error"


_LOGGED_UNKNOWN: set[str] = set()


def _is_off(value: Any, off: tuple[Any, ...]) -> bool:
    for default in off:
        if isinstance(default, bool) or isinstance(value, bool) or default is None or value is None:
            if value is default:
                return True
        elif value == default:
            return True
    return False


class _Strict(BaseModel):
    # Wrong types are rejected ("5" is not an int); unknown fields are kept in model_extra and logged.
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str  # required, as in OpenAI's API (400 without it)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported; this server returns exactly one choice (n=1)")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else (stop or [])
        if any(not s for s in items):
            raise ValueError("stop strings must be non-empty")
        return stop

    def resolved_max_tokens(self) -> int | None:
        return self.max_tokens

    def check_supported(self) -> None:
        """Reject OpenAI options the engine cannot honour instead of silently ignoring them."""
        extra = dict(self.model_extra or {})
        for name, off in _UNSUPPORTED_UNLESS_DEFAULT.items():
            value = extra.pop(name, None)
            if not _is_off(value, off):
                raise APIError(400, f"{name}={value!r} is not supported by this server", param=name)
        new = sorted(set(extra) - _LOGGED_UNKNOWN)
        if new:  # once per field name: a client sending them on every request must not flood the log
            _LOGGED_UNKNOWN.update(new)
            logger.warning("ignoring unknown request field(s) %s (logged once per name)", new)

    def sampling_params(self, max_tokens: int, structured_output: Any = None) -> SamplingParams:
        """The engine's SamplingParams; a ValueError from it becomes a 400 naming the parameter."""
        constrained = {"structured_output": structured_output} if structured_output is not None else {}
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else float(self.temperature),
                top_p=1.0 if self.top_p is None else float(self.top_p),
                top_k=self.top_k or 0,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                **constrained,
            )
        except ValueError as exc:
            raise bad_value(exc) from exc

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    response_format: dict[str, Any] | None = None

    def engine_prompt(self) -> str | dict[str, list[int]]:
        """One prompt as the engine takes it: a string or {"prompt_token_ids": [...]}."""
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if prompt and all(isinstance(t, int) for t in prompt):
            return {"prompt_token_ids": list(prompt)}
        raise APIError(400, "prompt must be one string or one list of token ids (batched prompts are not "
                            "supported; send one request per prompt)", param="prompt")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # OpenAI's schema: content is required, except for an assistant message that carries tool_calls
        # (or the legacy function_call).
        has_calls = any((self.model_extra or {}).get(k) for k in ("tool_calls", "function_call"))
        if self.content is None and not (self.role == "assistant" and has_calls):
            allowed = "required" if self.role != "assistant" else "required unless the message has tool_calls"
            raise ValueError(f"a {self.role!r} message needs 'content' ({allowed})")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_template_dict(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        extra = self.model_extra or {}
        if extra.get("tool_calls"):
            out["tool_calls"] = extra["tool_calls"]
        if self.role == "tool" and isinstance(extra.get("tool_call_id"), str):
            out["tool_call_id"] = extra["tool_call_id"]
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def resolved_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.as_template_dict() for m in self.messages]

    def content_chars(self) -> int:
        return sum(len(m.text()) for m in self.messages)


def parse_request(model: type[_SamplingRequest], body: bytes) -> Any:
    """Validate a JSON body; malformed JSON or a wrong type is a 400 naming the offending field."""
    try:
        request = model.model_validate_json(body or b"")
    except ValidationError as exc:
        raise validation_error(exc) from exc
    request.check_supported()
    return request


def validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first['msg']}", code="invalid_json")
    loc = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
    if first["type"] == "missing":  # its "input" is the whole enclosing object
        return APIError(400, f"{loc}: required field is missing", param=loc)
    message = f"{loc or 'body'}: {first['msg']}" + (f" (got {first['input']!r})" if loc and "input" in first else "")
    return APIError(400, message[:500], param=loc or None)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "bool", "float", "list[str]", "list[int]"}
                                      or part.startswith(("list[", "function-")))


def bad_value(exc: ValueError) -> APIError:
    """A ValueError from SamplingParams / the engine; its messages start with 'name=value'."""
    message = str(exc)
    head = message.split("=", 1)[0]
    param = head if head.isidentifier() else None
    return APIError(400, message, param=param)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt tokens whose KV came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_body(rid: str, model: str, text: str, finish: str | None, use: dict[str, int]) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use, "system_fingerprint": None}


def chat_body(rid: str, model: str, text: str | None, finish: str | None, use: dict[str, int],
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use, "system_fingerprint": None}


class ChunkWriter:
    """Builds SSE events (`data: {...}\\n\\n`) in OpenAI's chunk format for one streamed request."""

    def __init__(self, rid: str, model: str, chat: bool, include_usage: bool) -> None:
        self.rid, self.model, self.chat, self.include_usage = rid, model, chat, include_usage
        self.created = int(time.time())

    def _event(self, choices: list[dict[str, Any]], use: dict[str, int] | None = None) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        chunk: dict[str, Any] = {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
                                 "choices": choices, "system_fingerprint": None}
        if self.include_usage:
            chunk["usage"] = use
        return sse(chunk)

    def role(self) -> str:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._event([choice])

    def text(self, text: str, finish: str | None = None) -> str:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._event([choice])

    def tool_calls(self, deltas: list[dict[str, Any]]) -> str:
        """OpenAI's `delta.tool_calls`: a call's first entry has index, id, type and function.name (arguments
        ""), the next ones append to function.arguments."""
        return self._event([{"index": 0, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None}])

    def usage(self, use: dict[str, int]) -> str:
        return self._event([], use)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
