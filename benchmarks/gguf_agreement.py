#!/usr/bin/env python
"""Greedy agreement of the engine (GGUF, float16 on a GPU) with transformers float32 on the same GGUF file.

    python benchmarks/gguf_agreement.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/out/gguf

For each of --prompts chat prompts (>= 64; the model's chat template applied) both generate --tokens greedy tokens
(EOS ignored). Reported: the share of prompts whose tokens are all identical, with the engine serving from CUDA
graphs (capture="eager", the production path) and without graphs (capture="off"), and the largest absolute logit
difference between the graph-free engine and transformers over the positions where both saw the same tokens (up to
and including the first divergent one). Writes <out>/gguf_agreement.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

TOPICS = ["the moon", "photosynthesis", "the French revolution", "prime numbers", "volcanoes", "jazz music",
          "the immune system", "bicycles", "the Roman empire", "black holes", "coffee", "machine learning",
          "honey bees", "the Pacific ocean", "chess", "electric cars"]
FORMS = ["What is {}?", "Tell me three facts about {}.", "Explain {} to a child.", "Write a short poem about {}."]


def chat_prompts(n: int) -> list[list[dict[str, str]]]:
    """n chat conversations: every topic in every question form, then with a system message."""
    plain = [[{"role": "user", "content": form.format(topic)}] for form in FORMS for topic in TOPICS]
    brief = [[{"role": "system", "content": "Answer in one sentence."}, *chat] for chat in plain]
    prompts = (plain + brief) * (n // (2 * len(plain)) + 1)
    return prompts[:n]


class LogitRecorder:
    """Wraps the engine model's compute_logits (graph-free engine only: a graph replay bypasses Python)."""

    def __init__(self, model: Any) -> None:
        self.rows: list[torch.Tensor] = []
        self._inner = model.compute_logits
        model.compute_logits = self

    def __call__(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = self._inner(hidden, *args, **kwargs)
        self.rows.append(logits[0].float().clone())
        return logits


def hf_greedy(model: Any, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [row[0].float() for row in out.logits]


def engine_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    from hybrid_engine import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids


def compare(ours: list[int], ref: list[int], our_logits: list[torch.Tensor] | None,
            ref_logits: list[torch.Tensor] | None) -> dict[str, Any]:
    same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    row: dict[str, Any] = {"identical": ours == ref, "common_prefix": same}
    if our_logits is not None:
        upto = min(same + 1, len(our_logits), len(ref_logits))
        row["max_logit_diff"] = max(float((our_logits[i] - ref_logits[i].to(our_logits[i].device)).abs().max())
                                    for i in range(upto))
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from hybrid_engine import LLM
    from hybrid_engine.models.gguf import transformers_model

    t0 = time.perf_counter()
    ref_model, _ = transformers_model(args.gguf, torch.float32)
    ref_model = ref_model.to(args.device)
    graphs = LLM(args.gguf, dtype=args.dtype, device=args.device, capture="eager", max_model_len=1024)
    eager = LLM(args.gguf, dtype=args.dtype, device=args.device, capture="off", max_model_len=1024)
    recorder = LogitRecorder(eager.model)
    same_dtype = None  # transformers in the engine's dtype: how far that dtype alone moves greedy tokens
    if args.transformers_baseline and args.dtype != "float32":
        same_dtype = transformers_model(args.gguf, getattr(torch, args.dtype))[0].to(args.device)
    load_s = time.perf_counter() - t0
    rows = []
    for chat in chat_prompts(args.prompts):
        ids = graphs.encode_chat(chat)
        ref, ref_logits = hf_greedy(ref_model, ids, args.tokens)
        recorder.rows.clear()
        eager_tokens = engine_greedy(eager, ids, args.tokens)
        row = {"prompt": chat[-1]["content"], "system": len(chat) > 1,
               "graphs": compare(engine_greedy(graphs, ids, args.tokens), ref, None, None),
               "no_graphs": compare(eager_tokens, ref, recorder.rows[:args.tokens], ref_logits)}
        if same_dtype is not None:
            row["transformers_same_dtype"] = compare(hf_greedy(same_dtype, ids, args.tokens)[0], ref, None, None)
        rows.append(row)
    return summarize(args, rows, load_s)


def summarize(args: argparse.Namespace, rows: list[dict[str, Any]], load_s: float) -> dict[str, Any]:
    def share(key: str) -> float:
        return sum(r[key]["identical"] for r in rows) / len(rows)

    extra = {"identical_share_transformers_same_dtype": share("transformers_same_dtype")} \
        if "transformers_same_dtype" in rows[0] else {}
    return {
        **extra,
        "gguf": str(args.gguf), "dtype": args.dtype, "reference": "transformers float32", "device": args.device,
        "card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "prompts": len(rows), "tokens": args.tokens, "load_s": round(load_s, 1),
        "identical_share_graphs": share("graphs"), "identical_share_no_graphs": share("no_graphs"),
        "max_logit_diff": max(r["no_graphs"]["max_logit_diff"] for r in rows),
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True, type=Path, help="the GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--transformers-baseline", action="store_true",
                   help="also report transformers in --dtype against transformers float32 (the dtype's own effect)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    args = p.parse_args()
    if args.prompts < 1 or args.tokens < 1:
        raise SystemExit(f"--prompts={args.prompts} and --tokens={args.tokens} must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "gguf_agreement.json").write_text(json.dumps(result, indent=1))
    print(f"{result['prompts']} prompts x {result['tokens']} greedy tokens, engine {args.dtype} vs transformers "
          f"float32 on {result['card']}: identical {result['identical_share_graphs']:.1%} (capture=eager), "
          f"{result['identical_share_no_graphs']:.1%} (capture=off); largest logit difference "
          f"{result['max_logit_diff']:.3g}; wrote {args.out / 'gguf_agreement.json'}")
    if "identical_share_transformers_same_dtype" in result:
        print(f"transformers {args.dtype} vs transformers float32: identical "
              f"{result['identical_share_transformers_same_dtype']:.1%}")


if __name__ == "__main__":
    main()
