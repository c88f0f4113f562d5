"""Grammar-constrained decoding (hybrid_engine.structured, llguidance) on the host: constraints, compiler cache,
matchers, and the packed bitmask applied to logits rows. Decoding here is a pure host loop over random logits (no
model): masked greedy picks must always give output that matches the constraint, and unmasked ones must not."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from hybrid_engine.errors import OptionalDependencyError  # noqa: E402
from hybrid_engine.models.presets import build_tokenizer  # noqa: E402
from hybrid_engine.structured import (GuidedDecodingParams, allocate_token_bitmask, apply_token_bitmask,  # noqa: E402
                                      apply_token_bitmask_ref, bitmask_width, compiler_for, fill_bitmasks,
                                      unpack_bitmask)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
EXTRA_COLUMNS = 45  # the model's logits are wider than the tokenizer's vocabulary


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tokenizer(509)


def decode_greedy(tokenizer, params, seed, masked=True, max_steps=300):
    """Greedy over random logits, masked by the grammar: returns (text, terminated)."""
    vocab = len(tokenizer) + EXTRA_COLUMNS
    matcher = compiler_for(tokenizer, vocab).compile(params).matcher()
    bitmask = allocate_token_bitmask(1, vocab)
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(max_steps):
        logits = torch.randn(1, vocab, generator=gen)
        if masked:
            matcher.fill_bitmask(bitmask[0])
            apply_token_bitmask(logits, bitmask)
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        if not matcher.accept(token):
            return tokenizer.decode(tokens + [token]), False
        tokens.append(token)
        if matcher.is_terminated():
            break
    return tokenizer.decode(tokens), matcher.is_terminated()


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_greedy_output_validates_smollm2(smollm2_tokenizer, seed):
    text, terminated = decode_greedy(smollm2_tokenizer, GuidedDecodingParams(json_schema=SCHEMA), seed)
    assert terminated, text
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_greedy_output_validates_tiny(tiny_tokenizer, seed):
    text, terminated = decode_greedy(tiny_tokenizer, GuidedDecodingParams(json_schema=json.dumps(SCHEMA)), seed,
                                     max_steps=600)
    assert terminated, text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_unmasked_random_decoding_is_not_json(smollm2_tokenizer):
    """The control for the tests above: without the mask, random logits do not give the schema's JSON."""
    text, _ = decode_greedy(smollm2_tokenizer, GuidedDecodingParams(json_schema=SCHEMA), 0, masked=False,
                            max_steps=30)
    with pytest.raises(ValueError):
        json.loads(text)


def test_json_object_accepts_objects_only(smollm2_tokenizer):
    compiled = compiler_for(smollm2_tokenizer).compile(GuidedDecodingParams(json_object=True))
    matcher = compiled.matcher()
    assert matcher.accept_tokens(smollm2_tokenizer.encode('{"a": [1, {"b": null}]}', add_special_tokens=False))
    assert matcher.is_terminated() and matcher.error() is None
    refused = compiled.matcher()
    assert not refused.accept_tokens(smollm2_tokenizer.encode("[1]", add_special_tokens=False))


@pytest.mark.parametrize("seed", range(5))
def test_choice_gives_one_of_the_choices(smollm2_tokenizer, tiny_tokenizer, seed):
    choices = ["yes", "no", "maybe so", "Paris, France"]
    for tok in (smollm2_tokenizer, tiny_tokenizer):
        text, terminated = decode_greedy(tok, GuidedDecodingParams(choice=choices), seed)
        assert terminated and text in choices


@pytest.mark.parametrize("seed", range(5))
def test_regex_output_matches(smollm2_tokenizer, seed):
    pattern = r"[A-Z][a-z]{2,6} [0-9]{1,3}(\.[0-9]{2})?"
    text, terminated = decode_greedy(smollm2_tokenizer, GuidedDecodingParams(regex=pattern), seed)
    assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("kwargs, words", [
    ({}, "got none"),
    ({"regex": "a", "choice": ["x"]}, "got regex, choice"),
    ({"json_schema": 3}, "json_schema must be a JSON object"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"choice": []}, "choice must be a non-empty list"),
    ({"choice": ["ok", 3]}, "bad entries: [3]"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"json_object": "yes"}, "json_object must be True or False"),
])
def test_bad_params_name_the_field(kwargs, words):
    with pytest.raises(ValueError) as info:
        GuidedDecodingParams(**kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"json_schema": {"type": "strin"}}, "invalid json_schema: Invalid type: strin"),
    ({"json_schema": {"properties": {"a": {"$ref": "#/nowhere"}}}}, "/nowhere"),
    ({"regex": "(a"}, "invalid regex"),
    ({"grammar": "start: undefined_rule"}, "undefined_rule"),
])
def test_invalid_constraints_raise_naming_the_problem(tiny_tokenizer, kwargs, words):
    with pytest.raises(ValueError) as info:
        compiler_for(tiny_tokenizer).compile(GuidedDecodingParams(**kwargs))
    assert words in str(info.value)


def test_compiler_cache_per_tokenizer_and_constraint(tiny_tokenizer):
    compiler = compiler_for(tiny_tokenizer, 600)
    assert compiler_for(tiny_tokenizer, 600) is compiler
    assert compiler_for(tiny_tokenizer, 601) is not compiler
    assert compiler_for(build_tokenizer(509), 600) is not compiler
    first = compiler.compile(GuidedDecodingParams(json_schema={"type": "object", "required": ["a"]}))
    same = compiler.compile(GuidedDecodingParams(json_schema='{"required": ["a"], "type": "object"}'))
    other = compiler.compile(GuidedDecodingParams(json_schema={"type": "object"}))
    assert same is first and other is not first
    assert first.matcher() is not first.matcher()


def test_vocab_mismatch_disallows_ids_past_the_tokenizer(smollm2_tokenizer):
    vocab = len(smollm2_tokenizer) + EXTRA_COLUMNS
    matcher = compiler_for(smollm2_tokenizer, vocab).compile(GuidedDecodingParams(regex=r"[a-z ]+")).matcher()
    bitmask = allocate_token_bitmask(1, vocab)
    matcher.fill_bitmask(bitmask[0])
    allowed = unpack_bitmask(bitmask, vocab)[0]
    assert allowed[: len(smollm2_tokenizer)].sum() > 100
    assert not allowed[len(smollm2_tokenizer):].any()
    logits = torch.zeros(1, vocab + 7)  # wider still than the bitmask's 32 * W columns
    apply_token_bitmask(logits, bitmask)
    assert torch.isinf(logits[0, len(smollm2_tokenizer):]).all()


def test_bitmask_agrees_with_llguidance_logit_bias(smollm2_tokenizer):
    """Our unpacking of the packed mask against the library's own one-byte-per-token mask."""
    compiled = compiler_for(smollm2_tokenizer).compile(GuidedDecodingParams(json_schema=SCHEMA))
    matcher = compiled.matcher()
    assert matcher.accept_tokens(smollm2_tokenizer.encode('{"name": "Al', add_special_tokens=False))
    bitmask = allocate_token_bitmask(1, compiled.vocab_size)
    matcher.fill_bitmask(bitmask[0])
    bias = torch.frombuffer(bytearray(matcher._m.compute_logit_bias()), dtype=torch.uint8)
    assert torch.equal(unpack_bitmask(bitmask, compiled.vocab_size)[0], bias[: compiled.vocab_size] > 0)


def test_rollback_restores_the_earlier_mask(smollm2_tokenizer):
    compiled = compiler_for(smollm2_tokenizer).compile(GuidedDecodingParams(json_schema=SCHEMA))
    matcher = compiled.matcher()
    ids = smollm2_tokenizer.encode('{"name": "Bo", "age": 4', add_special_tokens=False)
    before, after = (allocate_token_bitmask(1, compiled.vocab_size) for _ in range(2))
    assert matcher.accept_tokens(ids[:3])
    matcher.fill_bitmask(before[0])
    assert matcher.accept_tokens(ids[3:])
    matcher.rollback(len(ids) - 3)
    matcher.fill_bitmask(after[0])
    assert torch.equal(before, after) and matcher.num_accepted == 3
    with pytest.raises(ValueError, match=r"rollback num_tokens must be in \[0, 3\]"):
        matcher.rollback(4)


def test_refused_token_puts_the_matcher_in_error(tiny_tokenizer):
    matcher = compiler_for(tiny_tokenizer).compile(GuidedDecodingParams(choice=["yes"])).matcher()
    assert not matcher.accept(tiny_tokenizer.convert_tokens_to_ids("n"))
    assert matcher.error() and matcher.is_terminated()


def test_fill_bitmasks_batch_equals_one_at_a_time(tiny_tokenizer):
    compiler = compiler_for(tiny_tokenizer)
    matchers = [compiler.compile(p).matcher() for p in (GuidedDecodingParams(choice=["cat", "dog"]),
                                                        GuidedDecodingParams(regex="[0-9]+"),
                                                        GuidedDecodingParams(json_object=True))]
    batch, single = allocate_token_bitmask(5, compiler.vocab_size), allocate_token_bitmask(5, compiler.vocab_size)
    fill_bitmasks([(m, row) for m, row in zip(matchers, (0, 2, 4))], batch)
    for m, row in zip(matchers, (0, 2, 4)):
        m.fill_bitmask(single[row])
    assert torch.equal(batch, single)
    assert (batch[1] == -1).all() and not (batch[0] == -1).all()


def test_fill_bitmask_rejects_a_wrong_buffer(tiny_tokenizer):
    matcher = compiler_for(tiny_tokenizer).compile(GuidedDecodingParams(regex="a+")).matcher()
    with pytest.raises(ValueError, match="int32"):
        matcher.fill_bitmask(torch.zeros(bitmask_width(matcher.vocab_size), dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \[rows, 16\]"):
        matcher.fill_bitmask(torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("vocab, width_delta", [(1, 0), (31, 0), (32, 0), (33, 0), (97, 0), (509, 0),
                                                (100, -1), (70, 2)])
def test_apply_token_bitmask_matches_reference(vocab, width_delta):
    """Random logits and masks, odd vocab sizes, logits wider (-1) and narrower (+2) than the mask."""
    gen = torch.Generator().manual_seed(vocab)
    width = max(1, bitmask_width(vocab) + width_delta)
    bitmask = torch.randint(-(2 ** 31), 2 ** 31, (5, width), dtype=torch.int64, generator=gen).to(torch.int32)
    logits = torch.randn(5, vocab, generator=gen)
    rows = [0, 3, 4]
    got, want = logits.clone(), logits.clone()
    apply_token_bitmask(got, bitmask, rows)
    apply_token_bitmask_ref(want, bitmask, rows)
    assert torch.equal(got, want)
    assert torch.equal(got[[1, 2]], logits[[1, 2]])  # unconstrained rows untouched
    assert vocab < 8 or torch.isinf(got[rows]).any()


def test_apply_token_bitmask_bad_inputs():
    with pytest.raises(ValueError, match="must be int32"):
        apply_token_bitmask(torch.zeros(2, 40), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"bitmask rows \(1\) must equal logits rows \(2\)"):
        apply_token_bitmask(torch.zeros(2, 40), torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\)"):
        apply_token_bitmask(torch.zeros(2, 40), torch.zeros(2, 2, dtype=torch.int32), [2])


def test_missing_llguidance_names_the_extra(monkeypatch, tiny_tokenizer):
    from hybrid_engine.structured import GrammarCompiler

    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(OptionalDependencyError, match=r"hybrid-engine\[structured\]"):
        GrammarCompiler(tiny_tokenizer)
