"""Grammar-constrained decoding (JSON schema, JSON object, regex, choice, Lark) through llguidance.

The engine's side, per step: for each constrained row, `Matcher.fill_bitmask` (or `fill_bitmasks` for the batch)
writes the allowed next tokens into a pinned [B, W] int32 bitmask on the host; `apply_token_bitmask(logits,
bitmask, rows)` masks those rows before sampling; `Matcher.accept(token)` advances each row's grammar.
llguidance is optional (`pip install 'hybrid-engine[structured]'`) and imported on first use.
"""
from .bitmask import (allocate_token_bitmask, apply_token_bitmask, apply_token_bitmask_ref, bitmask_width,
                      unpack_bitmask)
from .compiler import CompiledGrammar, GrammarCompiler, check_constraint, compiler_for
from .matcher import Matcher, fill_bitmasks
from .params import GuidedDecodingParams

__all__ = ["GuidedDecodingParams", "GrammarCompiler", "CompiledGrammar", "Matcher", "compiler_for",
           "check_constraint", "fill_bitmasks", "allocate_token_bitmask", "apply_token_bitmask",
           "apply_token_bitmask_ref", "bitmask_width", "unpack_bitmask"]
