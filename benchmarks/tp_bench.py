"""Tensor parallelism on the GPUs of one host, one lease: TP=1 and TP=N of the same shape (TTFT per prompt length,
TPOT both ways, greedy agreement of TP=N with TP=1), and a shape that needs N cards (70B) at TP=N against its floor.

    python benchmarks/tp_bench.py --tp 2 --model llama-2-7b-shape --big llama-3-70b-shape --out-dir OUT

Floors are per card: the weights one card reads per token (1/N of them) over the copy bandwidth measured here.
Results follow ../shared/BENCHMARKS.md: `tensor_parallel_size` at the top level, `systems.hybrid` the TP=N run,
`systems.hybrid_tp1` the TP=1 run, `tp_agreement` the share of prompts whose first 32 greedy tokens match TP=1.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.bench.harness import results_stem
from hybrid_engine.bench.hardware import (card_name, count_params, floors, measure_copy_GBps, measure_gemm_TFLOPs,
                                          versions)
from hybrid_engine.bench.measure import Plan, Prompts, measure_system
from hybrid_engine.bench.systems import HybridSystem
from hybrid_engine.models.loader import read_model_config


def _measure(llm: LLM, plan: Plan, seed: int) -> dict[str, Any]:
    system = HybridSystem(llm)
    prompts = Prompts(llm.tokenizer, llm.model.args.vocab_size, seed)
    return measure_system(system, plan, prompts, tick=lambda n: None, checkpoint=lambda r: None)


def _greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [llm.generate({"prompt_token_ids": p}, sp)[0].outputs[0].token_ids for p in prompts]


def _sum_name(llm: LLM) -> str:
    """What the ranks' row-parallel partials were summed in (HYBRID_ENGINE_TP_SUM): "float32" or "native"."""
    dtype = llm.executor.comm.sum_dtype
    return "native" if dtype is None else str(dtype).removeprefix("torch.")


def _free(llm: LLM) -> None:
    llm.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def _floors(cfg: Any, tp: int, copy: float, gemm: float, lengths: list[int]) -> dict[str, Any]:
    out = floors(count_params(cfg) // tp, 2, copy, gemm, lengths)
    out["per_card"] = f"1/{tp} of the weights per card" if tp > 1 else "all weights on one card"
    return out


def _result(model: str, tp: int, cmd: str, floor: dict[str, Any], systems: dict[str, Any], **extra: Any) -> dict:
    dev = torch.device("cuda", 0)
    return {"card": card_name(dev), **versions(), "model": model, "dtype": "float16", "tensor_parallel_size": tp,
            "command": cmd, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "floors": floor, "systems": systems,
            **extra}


TOPICS = ("the moon", "bread", "a lighthouse", "python lists", "rain", "chess", "volcanoes", "the ocean", "trains",
          "coffee", "bees", "winter", "a robot", "music", "mountains", "the internet")
ASKS = ("Write a short poem about {}.", "Explain {} to a child.", "Give three facts about {}.",
        "Tell a story about {}.")


def chat_prompts(model_dir: str, n: int) -> list[list[int]]:
    """n chat requests (an ask about a topic, as a user turn) through the checkpoint's tokenizer and chat template:
    prompts a learned model answers with confidence, unlike random token ids, where near-ties decide most steps."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [ASKS[i % len(ASKS)].format(TOPICS[(i // len(ASKS)) % len(TOPICS)]) for i in range(n)]
    out = []
    for text in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b-shape")
    ap.add_argument("--big", default="llama-3-70b-shape", help="a shape that needs --tp cards ('' to skip)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--skip-small", action="store_true", help="only the --big shape")
    ap.add_argument("--lengths", default="10,50,100,200")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--agreement", type=int, default=64, help="prompts for tp_agreement (32 greedy tokens each)")
    ap.add_argument("--agreement-prompts", choices=["auto", "ids", "chat"], default="auto",
                    help="tp_agreement's prompts: random token ids, or chat requests through the checkpoint's "
                         "tokenizer and chat template (auto: chat where the model directory has a tokenizer)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--out-dir", default=".")
    ap.add_argument("--variants", default="", help="TP=N engines to measure against the one TP=1 run, comma-"
                    "separated, each '' (as the environment says) or KEY=VALUE[+KEY=VALUE] with KEY allreduce "
                    "(HYBRID_ENGINE_ALLREDUCE) or tp_sum (HYBRID_ENGINE_TP_SUM); one results file each")
    a = ap.parse_args()
    import sys

    cmd = "python " + " ".join(sys.argv)
    lengths = [int(x) for x in a.lengths.split(",")]
    plan = Plan(lengths=lengths, runs=a.runs, gen_tokens=64, tpot_runs=10, stream_runs=1, tpot_prompt_len=100,
                warmup=2, settle_s=120.0)
    dev = torch.device("cuda", 0)
    copy = measure_copy_GBps(dev)
    gemm, _ = measure_gemm_TFLOPs(dev)
    torch.cuda.empty_cache()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the prompt lengths' buckets only: every capture happens at load under tensor parallelism
    opts = dict(max_model_len=a.max_model_len, max_num_seqs=8, prefill_buckets=(16, 64, 112, 208))
    gen = torch.Generator().manual_seed(0)
    kind = a.agreement_prompts
    if kind == "auto":
        kind = "chat" if os.path.isfile(os.path.join(a.model, "tokenizer.json")) else "ids"
    if kind == "chat":
        agree_prompts = chat_prompts(a.model, a.agreement)
    else:
        vocab = read_model_config(a.model).vocab_size
        agree_prompts = [torch.randint(3, vocab, (int(n),), generator=gen).tolist()
                         for n in torch.randint(8, 200, (a.agreement,), generator=gen)]
    a.agreement_kind = kind

    if not a.skip_small:
        _small(a, plan, opts, agree_prompts, copy, gemm, lengths, cmd, out)
    if a.big:
        _big(a, opts, copy, gemm, lengths, cmd, out)


def _small(a: Any, plan: Plan, opts: dict, agree_prompts: list, copy: float, gemm: float, lengths: list[int],
           cmd: str, out: Path) -> None:
    systems: dict[str, Any] = {}
    t0 = time.perf_counter()
    llm = LLM(a.model, **opts)
    load1 = time.perf_counter() - t0
    systems["hybrid_tp1"] = {**_measure(llm, plan, 1), "load_s": round(load1, 1)}
    ref = _greedy(llm, agree_prompts, 32)
    _free(llm)
    print("tp1", json.dumps({k: systems["hybrid_tp1"][k] for k in ("ttft_ms", "tpot_ms")}), flush=True)

    for variant in a.variants.split(","):
        with _variant_env(variant):
            _small_tp(a, plan, opts, agree_prompts, ref, dict(systems), copy, gemm, lengths, cmd, out, variant)


VARIANT_ENV = {"allreduce": "HYBRID_ENGINE_ALLREDUCE", "tp_sum": "HYBRID_ENGINE_TP_SUM"}


@contextlib.contextmanager
def _variant_env(variant: str):
    """`--variants` entry, e.g. "allreduce=nccl+tp_sum=float32" ('' = the environment as it is): those settings in
    os.environ (rank 0 reads them, the workers inherit them) while the TP engine runs."""
    saved = dict(os.environ)
    for item in filter(None, variant.split("+")):
        key, _, value = item.partition("=")
        if key not in VARIANT_ENV or not value:
            raise SystemExit(f"--variants entry {item!r}: use KEY=VALUE with KEY one of {sorted(VARIANT_ENV)}")
        os.environ[VARIANT_ENV[key]] = value
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _small_tp(a: Any, plan: Plan, opts: dict, agree_prompts: list, ref: list, systems: dict, copy: float,
              gemm: float, lengths: list[int], cmd: str, out: Path, variant: str) -> None:
    t0 = time.perf_counter()
    llm = LLM(a.model, tensor_parallel_size=a.tp, **opts)
    load = time.perf_counter() - t0
    systems["hybrid"] = {**_measure(llm, plan, 1), "load_s": round(load, 1),
                         "allreduce": llm.executor.comm.method, "tp_sum": _sum_name(llm)}
    got = _greedy(llm, agree_prompts, 32)
    agreement = sum(g == r for g, r in zip(got, ref)) / len(ref)
    tp, tp1 = systems["hybrid"], systems["hybrid_tp1"]
    ratios = {"tpot_tp_over_tp1": round(tp["tpot_ms"]["p50"] / tp1["tpot_ms"]["p50"], 3),
              "ttft_tp_over_tp1": {str(n): round(tp["ttft_ms"][str(n)]["p50"] / tp1["ttft_ms"][str(n)]["p50"], 3)
                                   for n in lengths}}
    print("tp", a.tp, variant or "(default)", json.dumps({k: systems["hybrid"][k] for k in ("ttft_ms", "tpot_ms")}),
          ratios, "agreement", agreement, flush=True)
    res = _result(a.model, a.tp, cmd, _floors(read_model_config(a.model), a.tp, copy, gemm, lengths), systems,
                  tp_agreement={"prompts": len(ref), "tokens": 32, "agreement": agreement,
                                "prompt_kind": a.agreement_kind},
                  ratios=ratios, floors_tp1=_floors(read_model_config(a.model), 1, copy, gemm, lengths),
                  **({"variant": variant} if variant else {}))
    slug = "".join(c if c.isalnum() else "-" for c in variant)
    name = out / f"{results_stem(res)}-tp{a.tp}{'-' + slug if slug else ''}.json"
    name.write_text(json.dumps(res, indent=1))
    print("wrote", name, flush=True)
    t0 = time.perf_counter()
    _free(llm)
    print(f"closed the TP={a.tp} engine in {time.perf_counter() - t0:.1f} s", flush=True)


def _big(a: Any, opts: dict, copy: float, gemm: float, lengths: list[int], cmd: str, out: Path) -> None:
    t0 = time.perf_counter()
    llm = LLM(a.big, tensor_parallel_size=a.tp, **opts)
    load = time.perf_counter() - t0
    big_plan = Plan(lengths=lengths, runs=max(10, a.runs // 2), gen_tokens=64, tpot_runs=6, stream_runs=1,
                    tpot_prompt_len=100, warmup=2, settle_s=60.0)
    sys_big = {**_measure(llm, big_plan, 2), "load_s": round(load, 1), "allreduce": llm.executor.comm.method,
               "tp_sum": _sum_name(llm)}
    fl = _floors(read_model_config(a.big), a.tp, copy, gemm, lengths)
    sys_big["tpot_over_floor"] = round(sys_big["tpot_ms"]["p50"] / fl["tpot_ms"], 3)
    sys_big["ttft_over_floor"] = {str(n): round(sys_big["ttft_ms"][str(n)]["p50"] / fl["ttft_ms"][str(n)], 3)
                                  for n in lengths}
    res = _result(a.big, a.tp, cmd, fl, {"hybrid": sys_big})
    name = out / f"{results_stem(res)}-tp{a.tp}.json"
    name.write_text(json.dumps(res, indent=1))
    print("big", json.dumps({k: sys_big[k] for k in ("ttft_ms", "tpot_ms", "tpot_over_floor", "ttft_over_floor")}),
          "wrote", name, flush=True)
    _free(llm)


if __name__ == "__main__":
    import os

    main()
    os._exit(0)  # the results are written; skip the interpreter's teardown of CUDA and NCCL state
