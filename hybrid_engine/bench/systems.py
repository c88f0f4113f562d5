"""The systems a benchmark compares, behind one small interface. Every timing is host-observed: it starts with
token ids (or text) on the host and ends when the generated token ids are on the host.

- hybrid: this engine (`LLM`), built on the same transformers model object the peers use.
- transformers_eager: `model.generate` with the default dynamic cache.
- transformers_static: `model.generate(cache_implementation="static")`; transformers compiles the decode step
  with torch.compile on a GPU (not on a CPU, where it runs the static cache uncompiled).
"""
from __future__ import annotations

import gc
import time
from typing import Any

import torch

SYSTEMS = ("hybrid", "transformers_eager", "transformers_static")


class HybridSystem:
    """This engine. It synchronizes its own stream before returning host tokens; the harness never calls a
    device-wide synchronize while it lives (that would break a background graph capture)."""

    name = "hybrid"

    def __init__(self, llm: Any) -> None:
        from hybrid_engine import SamplingParams

        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.device_type = llm.device.type
        self._params = SamplingParams
        self.last_engine_ttft_s = float("nan")

    def _sp(self, n: int) -> Any:
        return self._params(max_tokens=n, temperature=0.0, ignore_eos=True)

    def ttft_ids(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        out = self.llm.generate([{"prompt_token_ids": ids}], self._sp(1))[0]
        dt = time.perf_counter() - t0
        _check_tokens(out.outputs[0].token_ids, 1, self.name)
        self.last_engine_ttft_s = out.metrics.ttft_s
        return dt

    def ttft_text(self, text: str) -> float:
        t0 = time.perf_counter()
        out = self.llm.generate([text], self._sp(1))[0]
        dt = time.perf_counter() - t0
        _check_tokens(out.outputs[0].token_ids, 1, self.name)
        return dt

    def generate_e2e(self, ids: list[int], n: int) -> float:
        t0 = time.perf_counter()
        out = self.llm.generate([{"prompt_token_ids": ids}], self._sp(n))[0]
        dt = time.perf_counter() - t0
        _check_tokens(out.outputs[0].token_ids, n, self.name)
        return dt

    def stream(self, ids: list[int], n: int) -> tuple[float, list[float], float]:
        """(TTFT, per-token gaps after the first token, end-to-end) as a streaming client sees them."""
        clock = StepClock()
        for delta in self.llm.stream_deltas({"prompt_token_ids": ids}, self._sp(n)):
            clock.tokens(len(delta.token_ids))
        return clock.result(n, self.name)

    def stats(self) -> dict[str, Any]:
        return dict(self.llm.stats())

    def step_profile(self, ids: list[int], n: int = 48) -> dict[str, Any]:
        """Kernels per graph-replayed decode step and the GPU idle time between them (bench/step_profile.py), from
        one profiled request of `n` tokens; CUDA only."""
        from ..kernels._triton import pdl_mode
        from .step_profile import profile_decode_steps

        out = profile_decode_steps(lambda: self.generate_e2e(ids, n))
        # with programmatic dependent launch a kernel starts while its predecessor runs and waits inside: its
        # profiled duration (kernel_us_by_name) then includes that wait; HYBRID_ENGINE_PDL=0 gives kernels' own times
        out["pdl_mode"] = pdl_mode()
        return out

    def settle(self, timeout_s: float) -> dict[str, Any]:
        """Give the idle-capture worker its idle window: wait until no graph is pending (or timeout)."""
        deadline = time.monotonic() + timeout_s
        stats = self.stats()
        while (stats.get("graphs_pending", 0) or stats.get("capturing")) and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = self.stats()
        return stats

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class HFSystem:
    """transformers `generate`, eager (dynamic cache) or with the static cache (compiled decode on a GPU)."""

    def __init__(self, model: Any, tokenizer: Any, static: bool, max_cache_len: int) -> None:
        self.name = "transformers_static" if static else "transformers_eager"
        self.model, self.tokenizer = model, tokenizer
        self.device = model.device
        self.kwargs: dict[str, Any] = dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                                           pad_token_id=tokenizer.pad_token_id)
        if static:
            self.kwargs["cache_implementation"] = "static"
            if hasattr(model.generation_config, "max_cache_len"):  # one cache size for every call: no recompiles
                self.kwargs["max_cache_len"] = max_cache_len
        self.last_engine_ttft_s = float("nan")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _generate(self, input_ids: torch.Tensor, n: int, streamer: Any = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids)
        return self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   streamer=streamer, **self.kwargs)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def ttft_ids(self, ids: list[int]) -> float:
        self._sync()
        t0 = time.perf_counter()
        out = self._generate(self._ids(ids), 1)[0, len(ids):].tolist()
        dt = time.perf_counter() - t0
        _check_tokens(out, 1, self.name)
        return dt

    def ttft_text(self, text: str) -> float:
        self._sync()
        t0 = time.perf_counter()
        ids = self.tokenizer(text, return_tensors="pt").input_ids.to(self.device)
        out = self._generate(ids, 1)[0, ids.shape[1]:].tolist()
        dt = time.perf_counter() - t0
        _check_tokens(out, 1, self.name)
        return dt

    def generate_e2e(self, ids: list[int], n: int) -> float:
        self._sync()
        t0 = time.perf_counter()
        out = self._generate(self._ids(ids), n)[0, len(ids):].tolist()
        dt = time.perf_counter() - t0
        _check_tokens(out, n, self.name)
        return dt

    def stream(self, ids: list[int], n: int) -> tuple[float, list[float], float]:
        self._sync()
        clock = _HFStreamer()
        self._generate(self._ids(ids), n, streamer=clock)
        return clock.clock.result(n, self.name)

    def stats(self) -> dict[str, Any]:
        if self.model is None or not self.kwargs.get("cache_implementation"):
            return {}
        return {"compiled_decode": getattr(self.model, "_compiled_call", None) is not None}

    def settle(self, timeout_s: float) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.model = None


class StepClock:
    """Host timestamps of streamed tokens: TTFT, per-token gaps (a delta of k tokens counts k gaps of dt/k)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.ttft: float | None = None
        self.gaps: list[float] = []
        self.count = 0

    def tokens(self, k: int) -> None:
        if k <= 0:
            return
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.t0
            self.gaps.extend([0.0] * (k - 1))  # tokens that arrived with the first one
        else:
            self.gaps.extend([(now - self.last) / k] * k)
        self.last, self.count = now, self.count + k

    def result(self, n: int, who: str) -> tuple[float, list[float], float]:
        if self.count != n or self.ttft is None:
            raise RuntimeError(f"{who}: streamed {self.count} tokens, expected {n}")
        return self.ttft, self.gaps, self.last - self.t0


class _HFStreamer:
    """A transformers streamer (duck-typed BaseStreamer): the first put() is the prompt, then one per step."""

    def __init__(self) -> None:
        self.clock = StepClock()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.clock.tokens(int(value.numel()))

    def end(self) -> None:
        pass


def _check_tokens(tokens: list[int], n: int, who: str) -> None:
    if len(tokens) != n:  # never time a request that did less work than asked
        raise RuntimeError(f"{who}: generated {len(tokens)} tokens, expected {n}")


def gguf_source(model: str) -> str | None:
    """The GGUF file of a GGUF preset or .gguf path, else None (a random-weight preset)."""
    from hybrid_engine.models import gguf
    from hybrid_engine.models.presets import GGUF_PRESETS, packaged_gguf

    return packaged_gguf(model) if model in GGUF_PRESETS else model if gguf.is_gguf_file(model) else None


def model_config(model: str) -> Any:
    """The transformers config of a benchmark model (random-weight preset, GGUF preset or .gguf file)."""
    from hybrid_engine.models import gguf
    from hybrid_engine.models.presets import preset_config

    path = gguf_source(model)
    return gguf.read_config(path) if path is not None else preset_config(model)


def build_hf(model: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[Any, Any]:
    """transformers model + tokenizer: a preset's seeded random weights, or a GGUF file read by transformers."""
    from hybrid_engine.models import gguf
    from hybrid_engine.models.presets import build_hf_model

    path = gguf_source(model)
    if path is None:
        return build_hf_model(model, dtype=dtype, device=device, seed=seed)
    hf_model, tokenizer = gguf.transformers_model(path, dtype)
    return hf_model.to(device), tokenizer


def load_system(name: str, model: str, dtype: torch.dtype, device: torch.device, capture: str,
                max_cache_len: int, seed: int = 0) -> tuple[Any, dict[str, float]]:
    """Build one system on the model's weights (a preset's seeded random ones, or a GGUF file's, both read into a
    transformers model that the engine copies). Returns it and {"weights_s", "load_s"}: the time to materialise the
    weights on the device, then (hybrid only) the `LLM(...)` construction alone."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; choose from {list(SYSTEMS)}")
    t0 = time.perf_counter()
    hf_model, tok = build_hf(model, dtype, device, seed)
    _sync(device)
    t1 = time.perf_counter()
    if name == "hybrid":
        from hybrid_engine import LLM

        llm = LLM(model=hf_model, tokenizer=tok, dtype=str(dtype).removeprefix("torch."), device=device.type,
                  capture=capture)
        del hf_model
        system: Any = HybridSystem(llm)
    else:
        system = HFSystem(hf_model, tok, static=name == "transformers_static", max_cache_len=max_cache_len)
        _sync(device)  # never while the engine lives: a device-wide sync breaks its background capture
    return system, {"weights_s": t1 - t0, "load_s": time.perf_counter() - t1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(system: Any, device: torch.device) -> None:
    """Release a system's memory before the next one loads."""
    system.close()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
