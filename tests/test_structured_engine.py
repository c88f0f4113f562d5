"""Grammar-constrained sampling in the engine, on the tiny random model (fast): constrained output always matches
its grammar, in both step-loop modes (read at once, and the GPU's read-one-step-behind with the split step); the
unconstrained rows of a mixed batch get the tokens they get alone; preemption, chunked prefill, failures and bad
input stay local to their request."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from hybrid_engine import LLM, GuidedDecodingParams, SamplingParams  # noqa: E402
from hybrid_engine.errors import HybridEngineError  # noqa: E402
from hybrid_engine.structured import compiler_for  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "pos": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "boolean"}},
                "required": ["x", "y"], "additionalProperties": False},
    },
    "required": ["id", "kind", "tags", "pos"],
    "additionalProperties": False,
}
JSON = GuidedDecodingParams(json_schema=SCHEMA)
REGEX = r"[a-c]{2,5}-[0-9]{2}"
PROMPTS = [[1, 5, 9], [1, 77, 3, 200, 41, 8, 15], [1, 300], [1, 250, 12, 12, 12], [1, 42] * 5, [1, 499, 498]]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-llama", max_model_len=256, max_num_seqs=4)


@pytest.fixture(params=[False, True], ids=["read-at-once", "read-one-behind"])
def lookahead(request, llm):
    llm.core.lookahead = request.param
    yield request.param
    llm.core.lookahead = False


def _all_free(llm):
    s = llm.stats()
    return s["kv_blocks_free"] == s["kv_blocks_total"] and not s["request_in_flight"]


def _run(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def _mixed_params():
    """Greedy unconstrained rows between sampled constrained ones (JSON schema, regex, choice)."""
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    return [SamplingParams(max_tokens=120, temperature=1.0, seed=1, structured_output=JSON), greedy,
            SamplingParams(max_tokens=20, temperature=0.9, seed=2, structured_output=GuidedDecodingParams(
                regex=REGEX)),
            greedy, SamplingParams(max_tokens=20, temperature=1.0, seed=3, structured_output=GuidedDecodingParams(
                choice=["alpha", "beta", "gamma"])), greedy]


def _check_constrained(llm, outs):
    data = json.loads(outs[0].text)
    jsonschema.validate(data, SCHEMA)
    assert re.fullmatch(REGEX, outs[2].text), outs[2].text
    assert outs[4].text in ("alpha", "beta", "gamma")
    assert all(outs[i].finish_reason == "stop" for i in (0, 2, 4))
    for out, sp in zip(outs, _mixed_params()):  # replayed through a fresh matcher: every token was allowed
        if sp.structured_output is not None:
            matcher = compiler_for(llm.tokenizer, llm.model.args.vocab_size).compile(sp.structured_output).matcher()
            assert matcher.accept_tokens(out.token_ids) and matcher.is_terminated(), out.text


def test_mixed_batch_constrained_valid_and_unconstrained_unchanged(llm, lookahead):
    params = _mixed_params()
    alone = [_run(llm, [p], [sp])[0] for p, sp in zip(PROMPTS, params)]
    together = _run(llm, PROMPTS, params)
    _check_constrained(llm, together)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]  # every row, batched or not
    assert max(llm.stats()["decode_batch_sizes"]) == 4
    assert _all_free(llm)


def test_many_samples_under_a_schema_all_validate(llm):
    llm.core.lookahead = True  # the GPU's mode (the mixed-batch test covers both)
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured_output=JSON) for s in range(8)]
    try:
        outs = _run(llm, [PROMPTS[s % len(PROMPTS)] for s in range(8)], params)
    finally:
        llm.core.lookahead = False
    for out in outs:
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.finish_reason == "stop" and out.token_ids[-1] != 2  # ended by the grammar, not by EOS
    assert len({o.text for o in outs}) > 5  # sampled, not one forced string


def test_unmasked_sampling_is_not_the_grammar(llm):
    """The same requests without the constraint give no valid JSON: the test above depends on the mask."""
    outs = _run(llm, PROMPTS[:2], [SamplingParams(max_tokens=40, temperature=1.0, seed=s) for s in range(2)])
    for out in outs:
        with pytest.raises(ValueError):
            json.loads(out.text)


def test_eos_only_where_the_grammar_may_end(llm):
    """A regex that may stop after any digit: EOS comes only at an accepting point, and the text matches."""
    sp = [SamplingParams(max_tokens=40, temperature=1.5, seed=s, structured_output=GuidedDecodingParams(
        regex=r"[0-9]+")) for s in range(8)]
    outs = _run(llm, [PROMPTS[0]] * 8, sp)
    for out in outs:
        assert re.fullmatch(r"[0-9]+", out.text), out.text
        assert out.finish_reason in ("stop", "length")
    assert any(o.token_ids[-1] == 2 for o in outs)  # some did end on EOS (the only way this grammar ends)


def test_preempted_constrained_requests_recompute_and_match(lookahead):
    small = LLM("tiny-llama", max_model_len=160, max_num_seqs=4, num_kv_blocks=12, block_size=16)
    roomy = LLM("tiny-llama", max_model_len=160, max_num_seqs=4)
    small.core.lookahead = lookahead
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=10 + i, structured_output=JSON)
              if i % 2 == 0 else SamplingParams(max_tokens=60, temperature=0, ignore_eos=True) for i in range(6)]
    want = [o.token_ids for o in _run(roomy, PROMPTS, params)]
    got = _run(small, PROMPTS, params)
    assert [o.token_ids for o in got] == want
    assert small.stats()["preemptions"] > 0
    for out in got[::2]:
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert _all_free(small)


def test_constrained_long_prompt_is_prefilled_in_chunks(lookahead):
    llm = LLM("tiny-llama", max_model_len=256, max_num_seqs=4, prefill_chunk_size=16)
    llm.core.lookahead = lookahead
    long_prompt = [1] + [(7 * i + 3) % 500 for i in range(59)]
    sp = SamplingParams(max_tokens=30, temperature=0.7, seed=4, structured_output=GuidedDecodingParams(regex=REGEX))
    want = _run(llm, [long_prompt], [sp])[0].token_ids
    short = llm.stream_deltas({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=40, temperature=0,
                                                                                ignore_eos=True))
    next(short)
    got = _run(llm, [long_prompt], [sp])[0]
    short.close()
    assert llm.stats()["prefill_chunks"] == 4
    assert got.token_ids == want and re.fullmatch(REGEX, got.text)
    assert _all_free(llm)


def test_a_failing_matcher_fails_its_request_only(llm, lookahead, monkeypatch):
    from hybrid_engine.structured.matcher import Matcher

    params = _mixed_params()
    want = [o.token_ids for o in _run(llm, PROMPTS, params)]
    real_accept, calls = Matcher.accept, {"n": 0}

    def flaky(self, token):
        if self.num_accepted == 3:
            calls["n"] += 1
            if calls["n"] == 1:  # the first constrained request to reach its 4th token, only
                raise RuntimeError("injected matcher fault")
        return real_accept(self, token)

    monkeypatch.setattr(Matcher, "accept", flaky)
    failed_before = llm.stats()["requests_failed"]
    streams = [llm.stream_deltas({"prompt_token_ids": p}, sp) for p, sp in zip(PROMPTS, params)]
    results = []
    for s in streams:
        try:
            results.append([t for d in s for t in d.token_ids])
        except HybridEngineError as exc:
            assert "injected matcher fault" in str(exc)
            results.append(None)
    assert results.count(None) == 1
    assert all(r == w for r, w in zip(results, want) if r is not None)
    assert llm.stats()["requests_failed"] == failed_before + 1
    assert _all_free(llm)


def test_invalid_grammar_raises_at_submit_and_nothing_else_is_affected(llm):
    with pytest.raises(ValueError, match="invalid json_schema"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[1]}],
                     [SamplingParams(max_tokens=5), SamplingParams(
                         structured_output=GuidedDecodingParams(json_schema={"type": "objekt"}))])
    with pytest.raises(ValueError, match="invalid regex"):
        llm.generate("x", SamplingParams(structured_output=GuidedDecodingParams(regex="a(")))
    assert _all_free(llm) and llm.stats()["requests_running"] == 0
    assert _run(llm, PROMPTS[:1], _mixed_params()[1:2])[0].finish_reason == "length"


def test_structured_output_must_be_guided_decoding_params():
    with pytest.raises(ValueError, match=r"structured_output=\{'regex': 'a'\} must be None or a GuidedDecodingParams"):
        SamplingParams(structured_output={"regex": "a"})


# --- LLM.chat with tools -----------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}}}
CHAT = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def chat_llm():
    return LLM("tiny-llama", max_model_len=1536, max_num_seqs=2)


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "add"}}, "required"])
def test_forced_tool_call_is_parsed_and_valid(chat_llm, choice):
    for seed in range(3):
        out = chat_llm.chat(CHAT, SamplingParams(max_tokens=150, temperature=1.0, seed=seed), tools=[WEATHER, ADD],
                            tool_choice=choice, parallel_tool_calls=False).outputs[0]
        assert out.text.startswith("<tool_call>") and out.finish_reason == "stop", out.text
        assert len(out.tool_calls) == 1
        call = out.tool_calls[0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name == "add" if isinstance(choice, dict) else name in ("add", "get_weather")
        tool = {"add": ADD, "get_weather": WEATHER}[name]
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def test_chat_without_a_call_has_no_tool_calls(chat_llm):
    out = chat_llm.chat(CHAT, SamplingParams(max_tokens=8, temperature=0), tools=[WEATHER]).outputs[0]
    assert out.tool_calls is None and "<tool_call>" not in out.text
    plain = chat_llm.chat(CHAT, SamplingParams(max_tokens=8, temperature=0)).outputs[0]
    assert plain.tool_calls is None


@pytest.mark.parametrize("kwargs, words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "'sometimes'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "'bad name'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "parameters"),
    ({"tool_choice": "required"}, "at least one tool"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "sampling_params": SamplingParams(structured_output=JSON)}, "structured_output"),
])
def test_bad_tool_input_is_named(chat_llm, kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        chat_llm.chat(CHAT, **kwargs)
    assert _all_free(chat_llm)
