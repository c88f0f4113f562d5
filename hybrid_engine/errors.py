"""Exceptions raised by hybrid_engine."""


class HybridEngineError(RuntimeError):
    """Base class for engine failures that are not a caller's bad value (those raise ValueError)."""


class ModelLoadError(HybridEngineError, ValueError, OSError):
    """A checkpoint, preset or tokenizer could not be loaded; the message names the file or preset.

    Also a ValueError: the cause is a value the caller passed (a path, a preset name); and an OSError, which is what
    transformers' `from_pretrained` raises for a missing or unreadable checkpoint, so `except OSError` written for
    transformers catches it too (as io.UnsupportedOperation is both an OSError and a ValueError)."""


class UsageError(Exception):
    """A bad command-line value: the CLI prints it as one `error: ...` line on stderr and exits 2. Here rather than
    in cli.py so that subcommand modules raise the class `main` catches, also under `python -m hybrid_engine.cli`."""


class OptionalDependencyError(ImportError):
    """An optional package is missing; the message names the extra that installs it."""


def require(module: str, extra: str):
    """Import an optional module or raise an error that says which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OptionalDependencyError(
            f"{module!r} is not installed; install it with: pip install 'hybrid-engine[{extra}]'"
        ) from exc
