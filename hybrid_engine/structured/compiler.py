"""Grammars built once per (tokenizer, constraint) through llguidance, and a matcher per request.

llguidance (PyPI `llguidance`, the `structured` extra) turns a constraint into a grammar and, with the tokenizer's
vocabulary, into a matcher that knows which tokens may come next. Building the tokenizer view costs ~0.4 s for a
49k vocabulary and a grammar up to ~1 s for a large schema, so both are cached: one `GrammarCompiler` per
(tokenizer, vocab_size) (`compiler_for`), and inside it one compiled prototype per constraint; each request gets a
cheap copy of the prototype (`CompiledGrammar.matcher()`).
"""
from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any

from .library import load_llguidance
from .matcher import Matcher
from .params import GuidedDecodingParams

logger = logging.getLogger(__name__)

# JSON written as json.dumps writes it (", " and ": ", no other whitespace): bounded output, the form models saw
# most; a schema's own "x-guidance" options override these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(params: GuidedDecodingParams) -> str:
    """llguidance's grammar for a constraint (not yet checked; `check_constraint` checks it)."""
    llg = load_llguidance()
    kind = params.kind
    if kind == "json_schema":
        return llg.LLMatcher.grammar_from_json_schema(params.schema_dict(), defaults=JSON_DEFAULTS)
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return llg.grammar_from("choice", json.dumps(list(params.choice or ())))
    return llg.LLMatcher.grammar_from_lark(params.grammar)


def check_constraint(params: GuidedDecodingParams) -> str:
    """Compile-check a constraint without a tokenizer (a server can answer 400 before queueing the request).

    Returns the grammar text; raises ValueError naming the field and the library's description of the problem
    (e.g. "invalid json_schema: Invalid type: strin")."""
    llg = load_llguidance()
    try:
        grammar = grammar_text(params)
    except ValueError as exc:
        raise ValueError(f"invalid {params.kind}: {exc}") from exc
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"invalid {params.kind}: {messages[0].strip()}")
    for warning in messages:
        logger.warning("%s constraint: %s", params.kind, warning)
    return grammar


class CompiledGrammar:
    """One constraint compiled against one tokenizer; `matcher()` makes a fresh per-request matcher."""

    def __init__(self, prototype: Any, params: GuidedDecodingParams, vocab_size: int):
        self._prototype = prototype
        self.params = params
        self.vocab_size = vocab_size

    def matcher(self) -> Matcher:
        """A matcher at the start of the grammar (a copy of the compiled prototype: microseconds)."""
        return Matcher(self._prototype.deep_copy(), self.vocab_size)


class GrammarCompiler:
    """Compiles constraints for one tokenizer; keeps the last `max_cached` compiled grammars (LRU).

    vocab_size: width of the model's logits when it differs from the tokenizer's length (embedding tables are
    often padded); ids the tokenizer does not have are never allowed. Thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, max_cached: int = 256):
        llg = load_llguidance()
        import llguidance.hf

        self.vocab_size = max(int(vocab_size or 0), len(tokenizer))
        try:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size)
        except ValueError as exc:
            raise ValueError(f"structured output needs a fast (tokenizers-backed) tokenizer, got "
                             f"{type(tokenizer).__name__}: {exc}") from exc
        self._llg = llg
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()

    def compile(self, params: GuidedDecodingParams) -> CompiledGrammar:
        """The compiled grammar of `params`, built on first use; ValueError naming the problem if it is invalid."""
        key = params.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._build(params)
        with self._lock:
            compiled = self._cache.setdefault(key, compiled)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return compiled

    def _build(self, params: GuidedDecodingParams) -> CompiledGrammar:
        grammar = check_constraint(params)
        prototype = self._llg.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if prototype.is_error():
            raise ValueError(f"invalid {params.kind}: {prototype.get_error()}")
        logger.debug("compiled %s constraint for a %d-token vocabulary", params.kind, self.vocab_size)
        return CompiledGrammar(prototype, params, self.vocab_size)

    def cached(self) -> int:
        """How many compiled grammars the cache holds."""
        return len(self._cache)


_COMPILERS: "weakref.WeakKeyDictionary[Any, dict[int, GrammarCompiler]]" = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def compiler_for(tokenizer: Any, vocab_size: int | None = None) -> GrammarCompiler:
    """The GrammarCompiler of this tokenizer object and logits width, made once (released with the tokenizer)."""
    width = max(int(vocab_size or 0), len(tokenizer))
    with _COMPILERS_LOCK:
        per_width = _COMPILERS.setdefault(tokenizer, {})
        if width not in per_width:
            per_width[width] = GrammarCompiler(tokenizer, width)
        return per_width[width]
