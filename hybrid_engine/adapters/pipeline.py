"""`hybrid_engine.pipeline(...)`: transformers' text-generation pipeline with generation on the hybrid engine.

    from hybrid_engine import pipeline
    pipe = pipeline("text-generation", model="path/to/checkpoint", engine="hybrid", max_new_tokens=64)
    pipe("Hello", do_sample=False)[0]["generated_text"]

The returned object is a real `transformers.TextGenerationPipeline` subclass: inputs, chat templates, batching,
`return_full_text`, `stop_sequence` and the output format are transformers' own code; only the model is replaced by
`HybridModelForCausalLM` (hybrid_engine/adapters/hf.py). `engine="transformers"` returns the stock `transformers.pipeline`.
"""
from __future__ import annotations

import functools
from typing import Any

from .hf import HybridModelForCausalLM, check_generate_kwargs

ENGINES = ("hybrid", "transformers")
HYBRID_TASKS = ("text-generation",)
_DEVICE_TYPES = ("cpu", "cuda")


def pipeline(task: str | None = "text-generation", model: Any = None, tokenizer: Any = None,
             engine: str = "hybrid", *, device: Any = None, device_map: Any = None, dtype: Any = None,
             torch_dtype: Any = None, model_kwargs: dict[str, Any] | None = None,
             engine_kwargs: dict[str, Any] | None = None, trust_remote_code: bool | None = None,
             **kwargs: Any) -> Any:
    """Build a text-generation pipeline whose generation runs on the hybrid engine (or the stock one).

    model: checkpoint directory, .gguf file, engine preset ("tiny-llama", "smollm2-135m-instruct"), a transformers
        `PreTrainedModel` (its weights are copied into the engine), or an existing `hybrid_engine.LLM`.
    tokenizer: a tokenizer or a local tokenizer directory; None = the checkpoint's / preset's.
    engine: "hybrid" (default) or "transformers" (returns `transformers.pipeline(...)` with the same arguments).
    device / device_map / dtype: as for transformers; mapped onto the engine's single device and dtype.
    model_kwargs, engine_kwargs: extra `LLM(...)` keywords (EngineConfig fields: max_model_len, capture, ...).
    **kwargs: pipeline and generation defaults (max_new_tokens, do_sample, return_full_text, batch_size, ...).
    Unsupported generation options raise ValueError naming them.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not allowed; use one of {list(ENGINES)}")
    if engine == "transformers":
        return _stock_pipeline(task, model, tokenizer, engine_kwargs, device=device, device_map=device_map,
                               dtype=dtype if dtype is not None else torch_dtype, model_kwargs=model_kwargs,
                               trust_remote_code=trust_remote_code, **kwargs)
    _check_task(task)
    if model is None:
        raise ValueError("pipeline(engine='hybrid') needs model= (a checkpoint directory, a preset name such as "
                         "'tiny-llama', a PreTrainedModel or a hybrid_engine.LLM)")
    if "assistant_model" in kwargs:
        raise ValueError("assistant_model (assisted generation) is not supported by engine='hybrid'")
    llm_kwargs = dict(model_kwargs or {})
    llm_kwargs.update(engine_kwargs or {})
    engine_device = _engine_device(device, device_map)
    if engine_device is not None:
        llm_kwargs.setdefault("device", engine_device)
    engine_dtype = _engine_dtype(dtype if dtype is not None else torch_dtype)
    if engine_dtype is not None:
        llm_kwargs.setdefault("dtype", engine_dtype)
    if trust_remote_code is not None:
        llm_kwargs.setdefault("trust_remote_code", trust_remote_code)
    llm, generation_config = _build_llm(model, tokenizer, llm_kwargs)
    hybrid_model = HybridModelForCausalLM(llm, generation_config)
    return hybrid_pipeline_class()(model=hybrid_model, tokenizer=llm.tokenizer, task="text-generation",
                                   device=hybrid_model.device, **kwargs)


def _stock_pipeline(task: str | None, model: Any, tokenizer: Any, engine_kwargs: dict[str, Any] | None,
                    **kwargs: Any) -> Any:
    """transformers.pipeline(...); an engine preset name or a .gguf file becomes its transformers model (same weights
    for "tiny-llama" and the GGUF presets, so the two engines can be compared)."""
    import torch
    import transformers

    from ..engine import LLM
    from ..models import gguf
    from ..models.presets import GGUF_PRESETS, PRESETS, build_hf_model, packaged_gguf

    if engine_kwargs:
        raise ValueError(f"engine_kwargs {sorted(engine_kwargs)} only apply to engine='hybrid'")
    if isinstance(model, LLM):
        raise ValueError("engine='transformers' needs a transformers model or a checkpoint directory, not a "
                         "hybrid_engine.LLM")
    if isinstance(model, str) and model in PRESETS:
        dtype = _engine_dtype(kwargs.pop("dtype", None))
        model, preset_tokenizer = build_hf_model(model, getattr(torch, dtype if dtype not in (None, "auto")
                                                                else "float32"))  # the pipeline moves it
        tokenizer = tokenizer if tokenizer is not None else preset_tokenizer
    elif isinstance(model, str) and (model in GGUF_PRESETS or gguf.is_gguf_file(model)):
        dtype = _engine_dtype(kwargs.pop("dtype", None))
        path = packaged_gguf(model) if model in GGUF_PRESETS else model
        model, gguf_tokenizer = gguf.transformers_model(path, getattr(torch, dtype if dtype not in (None, "auto")
                                                                       else "float32"))
        tokenizer = tokenizer if tokenizer is not None else gguf_tokenizer
    return transformers.pipeline(task=task, model=model, tokenizer=tokenizer,
                                 **{k: v for k, v in kwargs.items() if v is not None})


@functools.cache
def hybrid_pipeline_class() -> type:
    """The `TextGenerationPipeline` subclass (built on first use: importing transformers' pipelines is slow)."""
    from transformers import TextGenerationPipeline

    class HybridTextGenerationPipeline(TextGenerationPipeline):
        """transformers' TextGenerationPipeline with `model` = HybridModelForCausalLM (generation on the engine)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # generation options given at construction (transformers >= 5.2x keeps them apart; older ones pass them
            # through _sanitize_parameters, checked below)
            check_generate_kwargs(getattr(self, "_generate_kwargs", None) or {})

        def check_model_type(self, supported_models: Any) -> None:
            """The engine's model registry already checked the architecture when the LLM was built."""

        def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
            preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
            check_generate_kwargs(forward)
            return preprocess, forward, postprocess

        def __call__(self, text_inputs: Any, **kwargs: Any) -> Any:
            _check_inputs(text_inputs)
            return super().__call__(text_inputs, **kwargs)

        def get_iterator(self, inputs: Any, num_workers: int, batch_size: int, preprocess_params: dict,
                         forward_params: dict, postprocess_params: dict) -> Any:
            """A list of inputs at batch_size 1 (the default) runs together: each input is prepared, generated and
            decoded as alone, with up to max_num_seqs generations in flight at once, which the engine batches."""
            if _runs_together(self, inputs, batch_size, forward_params):
                return iter(_run_together(self, inputs, preprocess_params, forward_params, postprocess_params))
            return super().get_iterator(inputs, num_workers, batch_size, preprocess_params, forward_params,
                                        postprocess_params)

    HybridTextGenerationPipeline.__module__ = __name__
    HybridTextGenerationPipeline.__qualname__ = "HybridTextGenerationPipeline"
    return HybridTextGenerationPipeline


def __getattr__(name: str) -> Any:
    if name == "HybridTextGenerationPipeline":
        return hybrid_pipeline_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _runs_together(pipe: Any, inputs: Any, batch_size: int, forward_params: dict[str, Any]) -> bool:
    """Greedy lists without a streamer: sampled ones stay one at a time, so that each input draws its seed from
    torch's generator in order (reproducible with transformers.set_seed, as with the stock pipeline)."""
    if not isinstance(inputs, list) or len(inputs) < 2 or batch_size != 1 or "streamer" in forward_params:
        return False
    kwargs = dict(forward_params)
    kwargs.pop("prefix_length", None)
    kwargs = pipe._prepare_generate_kwargs(kwargs)  # what _forward hands to model.generate
    try:
        return pipe.model.is_greedy(kwargs)
    except ValueError:  # bad options: the one-at-a-time path raises the error it always raised
        return False


def _run_together(pipe: Any, inputs: list[Any], preprocess_params: dict[str, Any], forward_params: dict[str, Any],
                  postprocess_params: dict[str, Any]) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    model_inputs = [pipe.preprocess(item, **preprocess_params) for item in inputs]
    workers = min(len(inputs), pipe.model.llm.config.max_num_seqs)
    with ThreadPoolExecutor(workers, thread_name_prefix="hybrid-pipeline") as pool:
        outputs = list(pool.map(lambda item: pipe.forward(item, **forward_params), model_inputs))
    return [pipe.postprocess(out, **postprocess_params) for out in outputs]


def _check_task(task: str | None) -> None:
    if task in HYBRID_TASKS:
        return
    from transformers.pipelines import PIPELINE_REGISTRY

    known = PIPELINE_REGISTRY.get_supported_tasks()
    if task not in known:
        raise ValueError(f"unknown task {task!r}; engine='hybrid' supports {list(HYBRID_TASKS)}")
    raise ValueError(f"task {task!r} is not supported by engine='hybrid' (supported: {list(HYBRID_TASKS)}); "
                     "use engine='transformers' for it")


def _check_inputs(inputs: Any) -> None:
    """Reject what transformers would fail on obscurely: empty input lists and empty chats."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("empty input: pass a prompt string, a list of prompts or a non-empty list of chat "
                             "messages ({'role': ..., 'content': ...})")
        for item in inputs:
            if isinstance(item, (list, tuple)) and not item:
                raise ValueError("empty chat: every conversation needs at least one message")
    elif inputs is None:
        raise ValueError("inputs is None: pass a prompt string, a list of prompts or chat messages")


def _engine_device(device: Any, device_map: Any) -> str | None:
    """transformers' device / device_map spelling -> the engine's one device ("cpu" or "cuda")."""
    import torch

    if device is not None and device_map is not None:
        raise ValueError("pass device= or device_map=, not both")
    if isinstance(device_map, dict):
        targets = {str(v) for v in device_map.values()}
        if len(targets) != 1:
            raise ValueError(f"device_map={device_map!r} spreads the model over {sorted(targets)}; the hybrid "
                             "engine runs a model on one device")
        device = targets.pop()
    elif device_map is not None:
        device = None if device_map == "auto" else device_map
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        device = "cpu" if int(device) < 0 else f"cuda:{int(device)}"
    dev = torch.device(device)
    if dev.type not in _DEVICE_TYPES or (dev.type == "cuda" and dev.index not in (None, 0)):
        raise ValueError(f"device={device!r} is not supported by engine='hybrid'; use 'cpu', 'cuda' or 0 "
                         "(to use another GPU set CUDA_VISIBLE_DEVICES)")
    return dev.type


def _engine_dtype(dtype: Any) -> str | None:
    import torch

    if dtype is None or dtype == "auto":
        return None if dtype is None else "auto"
    names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
    name = names.get(dtype, dtype)
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    return aliases.get(name, name) if isinstance(name, str) else str(name)


def _build_llm(model: Any, tokenizer: Any, llm_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """An LLM for `model`, and the generation defaults transformers would use for it (None = from its config)."""
    from ..engine import LLM

    if isinstance(model, LLM):
        if tokenizer is not None or llm_kwargs:
            raise ValueError(f"model is an already built LLM; tokenizer= and engine options "
                             f"{sorted(llm_kwargs)} cannot change it (pass them to LLM(...) instead)")
        return model, None
    if tokenizer is not None:
        llm_kwargs["tokenizer"] = tokenizer
    generation_config = getattr(model, "generation_config", None) if not isinstance(model, str) else None
    if isinstance(model, str):
        generation_config = _checkpoint_generation_config(model)
    return LLM(model, **llm_kwargs), generation_config


def _checkpoint_generation_config(path: str) -> Any:
    import os

    if not os.path.isfile(os.path.join(path, "generation_config.json")):
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(path)
