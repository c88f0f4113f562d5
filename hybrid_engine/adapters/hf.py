"""transformers-shaped facade over the engine: `HybridModelForCausalLM.generate()` runs on an `LLM`.

The hybrid text-generation pipeline (hybrid_engine/adapters/pipeline.py) keeps transformers' own preprocessing (tokenizer,
chat template, padding) and postprocessing, and swaps the model for this facade, so `pipe.model.generate(...)` (what
langchain_huggingface's streaming calls) takes the usual `generate` keywords and returns token ids like
transformers: prompt ids followed by the new ids, one row per prompt.

Generation keywords map to `SamplingParams`; those the engine cannot honour raise a ValueError naming them, unless
they carry their no-op default (num_beams=1, repetition_penalty=1.0, ...). Stop strings, `stopping_criteria` and
streamers are applied on the host, token by token, with transformers' semantics (the token that completes a stop
string is kept; the streamer gets the prompt first, then every new token, then `end()`).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch

from ..sampling_params import SamplingParams

logger = logging.getLogger(__name__)

SUPPORTED_GENERATE_KWARGS = frozenset({
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "stop_strings", "tokenizer", "streamer", "stopping_criteria", "attention_mask",
    "generation_config",
})
# Accepted only with these values, at which they change nothing.
NOOP_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "num_beams": (1,), "num_return_sequences": (1,), "use_cache": (True,), "repetition_penalty": (1.0,),
    "min_length": (0,), "min_new_tokens": (None, 0), "typical_p": (1.0,), "min_p": (None, 0.0),
    "no_repeat_ngram_size": (0,), "length_penalty": (1.0,), "early_stopping": (False,), "num_beam_groups": (1,),
    "output_scores": (False,), "output_logits": (False,), "output_attentions": (False,),
    "output_hidden_states": (False,), "return_dict_in_generate": (False,), "logits_processor": (None,),
    "decoder_start_token_id": (None,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,),
    "remove_invalid_values": (False,), "renormalize_logits": (False,), "diversity_penalty": (0.0,),
    "encoder_repetition_penalty": (1.0,), "bad_words_ids": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "assistant_model": (None,), "synced_gpus": (None, False),
}
# GenerationConfig bookkeeping that is not a generation choice.
_CONFIG_METADATA = frozenset({"transformers_version", "_from_model_config", "_commit_hash", "cache_implementation"})
# transformers' own fallbacks for what neither the model nor the call sets (GenerationConfig defaults).
_HF_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


def unsupported_generate_kwargs(kwargs: dict[str, Any]) -> list[str]:
    """Names in `kwargs` the engine cannot honour (unknown, or a known option away from its no-op value)."""
    bad = []
    for key, value in kwargs.items():
        if key in SUPPORTED_GENERATE_KWARGS or key in _CONFIG_METADATA or key == "prefix_length":
            continue
        if key in NOOP_DEFAULTS and any(value is v or value == v for v in NOOP_DEFAULTS[key]):
            continue
        bad.append(f"{key}={value!r}" if key in NOOP_DEFAULTS else key)
    return sorted(bad)


def check_generate_kwargs(kwargs: dict[str, Any]) -> None:
    """Raise ValueError naming every generation keyword the hybrid engine does not support."""
    bad = unsupported_generate_kwargs(kwargs)
    if bad:
        raise ValueError(
            f"generation option(s) {bad} are not supported by engine='hybrid'; supported: "
            f"{sorted(SUPPORTED_GENERATE_KWARGS - {'tokenizer', 'attention_mask'})} (use engine='transformers' "
            f"for the others)"
        )


class HybridModelForCausalLM:
    """Stands where a `PreTrainedModel` stands in a text-generation pipeline; generation runs on `llm`.

    It holds no weights of its own: `config` is the checkpoint's config, `generation_config` its generation
    defaults (as transformers derives them), `generate()` the engine.
    """

    main_input_name = "input_ids"
    input_modalities = ("text",)
    output_modalities = ("text",)
    hf_device_map = None

    def __init__(self, llm: Any, generation_config: Any = None) -> None:
        from transformers import GenerationConfig

        self.llm = llm
        self.config = llm.model_config
        self.generation_config = copy.deepcopy(generation_config) if generation_config is not None else \
            GenerationConfig.from_model_config(self.config)
        model = getattr(llm.config, "model", None)
        self.name_or_path = model if isinstance(model, str) else getattr(self.config, "_name_or_path", "") or ""

    @property
    def device(self) -> torch.device:
        return torch.device(self.llm.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    def can_generate(self) -> bool:
        return True

    def eval(self) -> "HybridModelForCausalLM":
        return self

    def to(self, device: Any) -> "HybridModelForCausalLM":
        """The engine's device is fixed when it is built; moving to another one is an error."""
        if torch.device(device).type != self.device.type:
            raise ValueError(f"the hybrid engine runs on {self.device}; it cannot be moved to {device!r}. "
                             "Choose the device when building it: pipeline(..., device=...)")
        return self

    def __repr__(self) -> str:
        return f"HybridModelForCausalLM(model={self.name_or_path!r}, device={self.device}, dtype={self.dtype})"

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None,
                 **kwargs: Any) -> torch.LongTensor:
        """Generate like `PreTrainedModel.generate` (greedy / sampling, batch of left-padded prompts).

        Prompt ids come as `inputs` (positional) or `input_ids=`, with an optional `attention_mask=`. Returns a
        LongTensor [batch, prompt_len + new_len] on the CPU: each row is its (padded) prompt followed by its new
        tokens (the EOS that ended it included), right-padded with pad_token_id to the longest row.
        """
        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        attention_mask = kwargs.pop("attention_mask", None)
        if generation_config is not None:
            kwargs["generation_config"] = generation_config
        check_generate_kwargs(kwargs)
        if input_ids is None or input_ids.numel() == 0:
            raise ValueError("input_ids is empty: the hybrid engine needs at least one prompt token")
        input_ids = input_ids.detach().cpu().long()
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        opts = self._resolve_options(kwargs)
        streamer = kwargs.get("streamer")
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError(f"streamer= needs a batch of one prompt, got {input_ids.shape[0]}")
        mask = attention_mask.detach().cpu().bool() if attention_mask is not None else None
        prompts = [(input_ids[i][mask[i]] if mask is not None else input_ids[i]).tolist()
                   for i in range(input_ids.shape[0])]
        if not all(prompts):
            raise ValueError("a prompt has no tokens after removing padding (attention_mask is all zero)")
        if streamer is None and not opts["stop_strings"] and not opts["stopping_criteria"]:
            news = self._generate_together(prompts, opts)
        else:
            tok = kwargs.get("tokenizer")
            news = [self._stream_one(p, self._sampling_params(len(p), opts), opts, streamer, tok) for p in prompts]
        rows = [input_ids[i].tolist() + new for i, new in enumerate(news)]
        pad = opts["pad_token_id"] if opts["pad_token_id"] is not None else (opts["eos_ids"] or [0])[0]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)

    def _resolve_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Merge transformers' defaults < model generation_config < call's generation_config < call kwargs."""
        merged = dict(_HF_DEFAULTS)
        merged.update(self.generation_config.to_diff_dict())
        if kwargs.get("generation_config") is not None:
            user_config = kwargs["generation_config"].to_diff_dict()
            check_generate_kwargs(user_config)
            merged.update(user_config)
        merged.update({k: v for k, v in kwargs.items() if k != "generation_config"})
        from_config = unsupported_generate_kwargs({k: v for k, v in merged.items() if k in NOOP_DEFAULTS})
        if from_config:
            raise ValueError(f"the model's generation_config sets {from_config}, which engine='hybrid' does not "
                             "support; pass the no-op value in the call (e.g. repetition_penalty=1.0) to override")
        eos = merged.get("eos_token_id")
        eos_ids = [] if eos is None else [int(e) for e in (eos.tolist() if torch.is_tensor(eos) else
                                                           (eos if isinstance(eos, Iterable) else [eos]))]
        stops = merged.get("stop_strings") or []
        return {
            "max_new_tokens": merged.get("max_new_tokens"), "max_length": merged.get("max_length"),
            "greedy": not merged.get("do_sample") or merged.get("temperature") == 0,
            "temperature": float(merged.get("temperature") or 1.0), "top_k": int(merged.get("top_k") or 0),
            "top_p": float(merged.get("top_p") if merged.get("top_p") is not None else 1.0),
            "eos_ids": eos_ids, "pad_token_id": merged.get("pad_token_id"),
            "stop_strings": [stops] if isinstance(stops, str) else list(stops),
            "stopping_criteria": list(merged.get("stopping_criteria") or []),
        }

    def _sampling_params(self, prompt_len: int, opts: dict[str, Any]) -> SamplingParams:
        max_new = opts["max_new_tokens"]
        if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
            raise ValueError(f"max_new_tokens={max_new!r} must be an int >= 1")  # named as the caller passed it
        if max_new is None:
            max_new = opts["max_length"] - prompt_len
            if max_new < 1:
                raise ValueError(f"max_length={opts['max_length']} leaves no room after the {prompt_len}-token "
                                 "prompt; pass max_new_tokens instead")
        if opts["greedy"]:
            return SamplingParams(max_tokens=max_new, temperature=0.0, stop_token_ids=opts["eos_ids"],
                                  ignore_eos=True)
        # Sampled requests draw their seed from torch's global generator, so torch.manual_seed() /
        # transformers.set_seed() make them reproducible as they do with transformers.
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return SamplingParams(max_tokens=max_new, temperature=opts["temperature"], top_k=opts["top_k"],
                              top_p=opts["top_p"], seed=seed, stop_token_ids=opts["eos_ids"], ignore_eos=True)

    def is_greedy(self, kwargs: dict[str, Any]) -> bool:
        """Whether `generate(**kwargs)` decodes greedily (merged with the generation config as generate does)."""
        return self._resolve_options(kwargs)["greedy"]

    def _generate_together(self, prompts: list[list[int]], opts: dict[str, Any]) -> list[list[int]]:
        """Every row in one engine call (batched); seeds drawn in row order, as one row at a time would."""
        params = [self._sampling_params(len(p), opts) for p in prompts]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [list(o.outputs[0].token_ids) for o in outs]

    def _stream_one(self, prompt: list[int], params: SamplingParams, opts: dict[str, Any], streamer: Any,
                    tokenizer: Any) -> list[int]:
        stop_check = _StopCheck(prompt, opts, tokenizer or self.llm.tokenizer)
        new: list[int] = []
        try:
            if streamer is not None:
                streamer.put(torch.tensor([prompt], dtype=torch.long))
            gen = self.llm.stream_deltas({"prompt_token_ids": prompt}, params)
            try:
                for delta in gen:
                    for tok in delta.token_ids:
                        new.append(tok)
                        if streamer is not None:
                            streamer.put(torch.tensor([tok], dtype=torch.long))
                        if stop_check(new):
                            return new
            finally:
                gen.close()  # cancels the request when a host-side stop ended it early
            return new
        finally:
            if streamer is not None:
                streamer.end()


class _StopCheck:
    """Host-side stop conditions with transformers' semantics, checked after every new token."""

    def __init__(self, prompt: list[int], opts: dict[str, Any], tokenizer: Any) -> None:
        self.prompt = prompt
        self.stop_strings = opts["stop_strings"]
        self.criteria = opts["stopping_criteria"]
        self.tokenizer = tokenizer
        # A stop string of n characters spans at most n tokens, plus one that overhangs its start.
        self.window = max((len(s) for s in self.stop_strings), default=0) + 2

    def __call__(self, new: list[int]) -> bool:
        return self._stop_string_hit(new) or self._criteria_hit(new)

    def _stop_string_hit(self, new: list[int]) -> bool:
        """True when a stop string ends inside the last token's text (StopStringCriteria's rule)."""
        if not self.stop_strings:
            return False
        ids = (self.prompt + new)[-self.window:]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        before = self.tokenizer.decode(ids[:-1], skip_special_tokens=False)
        for stop in self.stop_strings:
            start = max(0, len(before) - len(stop) + 1)
            if stop in text[start:]:
                return True
        return False

    def _criteria_hit(self, new: list[int]) -> bool:
        if not self.criteria:
            return False
        ids = torch.tensor([self.prompt + new], dtype=torch.long)
        for criterion in self.criteria:
            hit = criterion(ids, None)  # scores are not computed on the host; criteria that need them fail here
            if bool(torch.as_tensor(hit).any()):
                return True
        return False
