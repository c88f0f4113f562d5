"""What the LLM and the chat model share: the engine fields and per-call sampling options."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed")


class HybridEngineFields(BaseModel):
    """Fields shared by `HybridLLM` and `ChatHybrid`.

    Build from an engine (`llm=LLM(...)`) or from a model name/path plus engine options
    (`model="tiny-llama", engine_kwargs={"device": "cpu"}`); the engine is then built once, on construction.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    llm: Any = Field(default=None, exclude=True)
    """A `hybrid_engine.LLM`. Built from `model` and `engine_kwargs` when not given."""
    model: str | None = None
    """Checkpoint directory or engine preset. Inferred from `llm` when that is given."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keywords for `hybrid_engine.LLM(model, **engine_kwargs)` (EngineConfig fields)."""
    max_tokens: int = 256
    """Most tokens to generate."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy."""
    top_k: int = 0
    """Top-k sampling; 0 disables it."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 disables it."""
    seed: int | None = None
    """Seed for sampled generation (reproducible results)."""
    stop: list[str] | None = None
    """Default stop sequences (cut from the output); a call's `stop` replaces them."""

    @model_validator(mode="after")
    def _build_engine(self) -> "HybridEngineFields":
        if self.llm is None:
            if self.model is None:
                raise ValueError("pass llm= (a hybrid_engine.LLM) or model= (a checkpoint directory or preset)")
            from hybrid_engine import LLM

            self.llm = LLM(self.model, **self.engine_kwargs)
        else:
            if self.engine_kwargs:
                raise ValueError(f"engine_kwargs {sorted(self.engine_kwargs)} cannot change an already built llm; "
                                 "pass them to LLM(...) instead")
            if self.model is None:
                name = getattr(self.llm.config, "model", None)
                self.model = name if isinstance(name, str) else type(name).__name__
        return self

    def sampling_params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> Any:
        """This model's defaults, overridden by a call's options; unknown options raise ValueError."""
        from hybrid_engine import SamplingParams

        unknown = sorted(set(kwargs) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"unsupported option(s) {unknown}; allowed per call: {list(SAMPLING_FIELDS)} and stop")
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        values.update(kwargs)
        return SamplingParams(stop=list(stop if stop is not None else self.stop or []), **values)

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return self.engine_params()

    def engine_params(self) -> dict[str, Any]:
        """The identifying parameters: model and default sampling options."""
        return {"model": self.model, **{name: getattr(self, name) for name in SAMPLING_FIELDS}, "stop": self.stop}
