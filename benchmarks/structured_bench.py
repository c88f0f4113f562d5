"""Structured output on the GPU: what a grammar costs the constrained request and the requests beside it.

  python benchmarks/structured_bench.py --out structured.json                       # llama-2-7b-shape, CUDA
  python benchmarks/structured_bench.py --preset tiny-llama --tokens 16 --runs 1 --out /tmp/s.json   # CPU smoke

TPOT (RequestMetrics.tpot_s, median over requests) of: one JSON-schema-constrained request at batch 1 vs the same
request unconstrained; 6 unconstrained requests batched beside 2 constrained ones vs the 6 alone (both batches pad
to the 8-row graph, so the difference is what the constrained neighbours cost: the split step and its host work);
and 8 beside 2 vs 8 alone, which also crosses from the 8-row to the 16-row graph, with 10 alone beside it to show
how much of that difference is the bigger graph. Random weights under a JSON
schema write garbage inside the grammar (one unbounded string): fine for timing; ignore_eos and max_tokens keep
the lengths fixed unless the grammar happens to close. Results go to --out under "structured_output".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from hybrid_engine import LLM, GuidedDecodingParams, SamplingParams
from hybrid_engine.bench.hardware import card_name, versions

# one object holding one unbounded string: the grammar stays open for as long as the sampled tokens let it
SCHEMA = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"],
          "additionalProperties": False}


def _prompt(gen: torch.Generator, vocab: int, length: int) -> dict:
    return {"prompt_token_ids": [1] + torch.randint(3, vocab, (length - 1,), generator=gen).tolist()}


def _params(tokens: int, seed: int, constrained: bool) -> SamplingParams:
    grammar = GuidedDecodingParams(json_schema=SCHEMA) if constrained else None
    return SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed, ignore_eos=True, structured_output=grammar)


def _tpot_ms(outputs: list) -> list[float]:
    return [o.metrics.tpot_s * 1e3 for o in outputs if o.metrics.generated_tokens > 1]


def batch1_tpot(llm: LLM, vocab: int, tokens: int, runs: int, constrained: bool) -> dict:
    gen = torch.Generator().manual_seed(11)
    xs, lengths = [], []
    for i in range(runs):
        out = llm.generate(_prompt(gen, vocab, 32), _params(tokens, i, constrained))
        xs += _tpot_ms(out)
        lengths.append(out[0].metrics.generated_tokens)
    return {"tpot_ms": statistics.median(xs), "generated_tokens": lengths}


def batch_tpot(llm: LLM, vocab: int, tokens: int, runs: int, plain: int, constrained: int) -> dict:
    """Median TPOT of the `plain` unconstrained requests of a batch that also holds `constrained` ones."""
    gen = torch.Generator().manual_seed(12)
    xs = []
    for r in range(runs):
        kinds = [False] * plain + [True] * constrained
        prompts = [_prompt(gen, vocab, 32) for _ in kinds]
        outs = llm.generate(prompts, [_params(tokens, 100 * r + i, c) for i, c in enumerate(kinds)])
        xs += _tpot_ms([o for o, c in zip(outs, kinds) if not c])
    return {"tpot_ms": statistics.median(xs), "rows": plain + constrained}


def warm_up(llm: LLM, vocab: int) -> None:
    """Compile the grammar once and run every step shape the measurements use (graphs are captured at load with
    capture="eager"; the split-step graphs are asked for by the first constrained batch otherwise)."""
    gen = torch.Generator().manual_seed(10)
    for rows, constrained in ((1, 0), (1, 1), (6, 0), (6, 2), (8, 0), (8, 2), (10, 0)):
        prompts = [_prompt(gen, vocab, 32) for _ in range(rows + constrained)]
        llm.generate(prompts, [_params(8, i, i >= rows) for i in range(rows + constrained)])
    if llm.graphs is not None:
        llm.graphs.worker.wait_idle(300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-2-7b-shape", help="model preset (tiny-llama for a CPU smoke run)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per request")
    ap.add_argument("--runs", type=int, default=5, help="requests (batch 1) or batches per measurement")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    llm = LLM(args.preset, max_num_seqs=16, max_model_len=512, capture="eager" if cuda else "off")
    vocab = llm.model_config.vocab_size
    warm_up(llm, vocab)
    b1_constrained = batch1_tpot(llm, vocab, args.tokens, args.runs, constrained=True)
    b1_plain = batch1_tpot(llm, vocab, args.tokens, args.runs, constrained=False)
    mixed = batch_tpot(llm, vocab, args.tokens, args.runs, plain=6, constrained=2)
    plain6 = batch_tpot(llm, vocab, args.tokens, args.runs, plain=6, constrained=0)
    mixed10 = batch_tpot(llm, vocab, args.tokens, args.runs, plain=8, constrained=2)
    plain8 = batch_tpot(llm, vocab, args.tokens, args.runs, plain=8, constrained=0)
    plain10 = batch_tpot(llm, vocab, args.tokens, args.runs, plain=10, constrained=0)
    result = {
        "tpot_constrained_ms": b1_constrained["tpot_ms"],
        "tpot_unconstrained_ms": b1_plain["tpot_ms"],
        "batch_mixed_tpot_ms": mixed["tpot_ms"],  # 6 unconstrained beside 2 constrained (8-row graph)
        "batch_plain_tpot_ms": plain6["tpot_ms"],  # the same 6 alone (8-row graph)
        "batch_mixed_8_2_tpot_ms": mixed10["tpot_ms"],  # 8 unconstrained beside 2 constrained (16-row graph)
        "batch_plain8_tpot_ms": plain8["tpot_ms"],  # 8 alone (8-row graph)
        "batch_plain10_tpot_ms": plain10["tpot_ms"],  # 10 unconstrained rows: the 8 + 2 batch's rows
        "constrained_over_unconstrained": b1_constrained["tpot_ms"] / b1_plain["tpot_ms"],
        "mixed_over_plain": mixed["tpot_ms"] / plain6["tpot_ms"],
        "mixed_8_2_over_plain8": mixed10["tpot_ms"] / plain8["tpot_ms"],
        "mixed_8_2_over_plain10": mixed10["tpot_ms"] / plain10["tpot_ms"],
        "constrained_generated_tokens": b1_constrained["generated_tokens"],
        "tokens": args.tokens, "runs": args.runs,
    }
    print(json.dumps(result), flush=True)
    stats = llm.stats()
    res = {"card": card_name(llm.device), **versions(), "model": args.preset, "dtype": str(llm.dtype)[6:],
           "command": "python " + " ".join(sys.argv), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "structured_output": result,
           "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))},
           "graphs": stats.get("graphs", [])}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    llm.close()


if __name__ == "__main__":
    main()
