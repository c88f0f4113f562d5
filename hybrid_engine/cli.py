"""`hybrid-engine generate | bench | serve`."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence


def _generate(args: argparse.Namespace) -> int:
    import torch

    from . import LLM, SamplingParams

    model = args.model or ("llama-2-7b-shape" if torch.cuda.is_available() else "tiny-llama")
    t0 = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, device=args.device, capture=args.capture)
    print(f"[hybrid-engine] loaded {model} on {llm.device} ({llm.dtype}) in {time.perf_counter() - t0:.1f}s; "
          f"attention={llm.ops.name}", file=sys.stderr)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    try:
        if args.stream:
            for delta in llm.stream_deltas(args.prompt, params):
                print(delta.text, end="", flush=True)
            print()
            metrics = delta.metrics
        else:
            out = llm.generate(args.prompt, params)[0]
            print(out.outputs[0].text)
            metrics = out.metrics
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[hybrid-engine] {metrics.prompt_tokens} prompt + {metrics.generated_tokens} generated tokens; "
          f"TTFT {metrics.ttft_s * 1e3:.2f} ms, per token {metrics.tpot_s * 1e3:.2f} ms", file=sys.stderr)
    llm.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid-engine", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="checkpoint dir or preset (default: tiny-llama on CPU, "
                                                  "llama-2-7b-shape on GPU)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--capture", default="idle", choices=["idle", "eager", "off"])
    g.add_argument("--stream", action="store_true")
    g.set_defaults(func=_generate)
    sub.add_parser("bench", help="latency benchmark (see `hybrid-engine bench --help`)", add_help=False)
    sub.add_parser("serve", help="OpenAI-compatible server (see `hybrid-engine serve --help`)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "serve":
        from .server import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
