"""What a request asks its output to match: a JSON schema, any JSON object, a regex, one of several strings, or a
Lark grammar (llguidance's dialect). Pure data: checking that a schema or regex compiles needs the grammar library
and happens in `compiler.py`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CONSTRAINT_FIELDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(slots=True, frozen=True)
class GuidedDecodingParams:
    """Exactly one constraint for a request's output (the fields of vLLM's `GuidedDecodingParams`).

    json_schema: a JSON schema as a dict or a JSON string; the output is JSON that validates against it.
    json_object: True for any JSON object (OpenAI's `response_format={"type": "json_object"}`).
    regex: the output matches this regular expression in full (Rust `regex` syntax).
    choice: the output is exactly one of these strings.
    grammar: a Lark grammar in llguidance's dialect (`start: ...`; `%json {...}` embeds a schema).

    Setting none or several, or a value of the wrong type, raises ValueError naming the field."""

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in CONSTRAINT_FIELDS if _is_set(getattr(self, name))]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise ValueError(f"GuidedDecodingParams needs exactly one of {', '.join(CONSTRAINT_FIELDS)}; got {what}")
        _CHECKS[given[0]](getattr(self, given[0]))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        """The name of the field that is set: "json_schema", "json_object", "regex", "choice" or "grammar"."""
        return next(name for name in CONSTRAINT_FIELDS if _is_set(getattr(self, name)))

    def schema_dict(self) -> dict[str, Any] | None:
        """The JSON schema as a dict (parsed when given as a string), or None for other kinds."""
        if self.json_schema is None:
            return None
        return json.loads(self.json_schema) if isinstance(self.json_schema, str) else self.json_schema

    def cache_key(self) -> tuple[str, str]:
        """(kind, canonical text): equal constraints written differently (key order, spacing) share a key."""
        kind = self.kind
        if kind == "json_schema":
            return kind, json.dumps(self.schema_dict(), sort_keys=True, separators=(",", ":"))
        if kind == "json_object":
            return kind, ""
        if kind == "choice":
            return kind, json.dumps(list(self.choice or ()))
        return kind, str(getattr(self, kind))


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


def _check_schema(value: Any) -> None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json_schema is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"json_schema must be a JSON object (dict or its JSON text), got {type(value).__name__}")


def _check_json_object(value: Any) -> None:
    if value is not True:
        raise ValueError(f"json_object must be True or False, got {value!r}")


def _check_text(field: str):
    def check(value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{field} must be a non-empty string, got {value!r}")
    return check


def _check_choice(value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"choice must be a non-empty list of strings, got {value!r}")
    bad = [c for c in value if not isinstance(c, str) or not c]
    if bad:
        raise ValueError(f"choice must hold non-empty strings only; bad entries: {bad!r}")


_CHECKS = {"json_schema": _check_schema, "json_object": _check_json_object, "regex": _check_text("regex"),
           "choice": _check_choice, "grammar": _check_text("grammar")}
