"""Engine behaviour on CPU: API shape, streaming, sampling, stop conditions, bad input, KV accounting."""
import pytest
import torch
from block_helpers import blocks_settled

from hybrid_engine import LLM, EngineConfig, SamplingParams
from hybrid_engine.errors import ModelLoadError


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-llama", max_model_len=256)


def _all_free(llm):
    return blocks_settled(llm)


def test_generate_shapes_and_metrics(llm):
    outs = llm.generate(["Hello", {"prompt_token_ids": [1, 5, 9]}], SamplingParams(max_tokens=6, temperature=0))
    assert [o.prompt_token_ids for o in outs][1] == [1, 5, 9]
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 6 and c.finish_reason == "length"
        assert o.metrics.generated_tokens == 6 and o.metrics.prompt_tokens == len(o.prompt_token_ids)
        assert 0 < o.metrics.ttft_s <= o.metrics.e2e_s and o.metrics.tpot_s > 0
    assert _all_free(llm)


def test_stream_equals_generate(llm):
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = llm.generate("Streaming test", p)[0].outputs[0]
    deltas = list(llm.stream_deltas("Streaming test", p))
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert "".join(d.text for d in deltas) == full.text == "".join(llm.stream("Streaming test", p))
    assert deltas[-1].finish_reason == "length" and deltas[-1].metrics.generated_tokens == 20


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    a = llm.generate("seed", p)[0].outputs[0].token_ids
    b = llm.generate("seed", p)[0].outputs[0].token_ids
    c = llm.generate("seed", SamplingParams(max_tokens=24, temperature=1.0, seed=99))[0].outputs[0].token_ids
    assert a == b and a != c


def test_top_k_one_is_greedy(llm):
    g = llm.generate("abc", SamplingParams(max_tokens=10, temperature=0))[0].outputs[0].token_ids
    k1 = llm.generate("abc", SamplingParams(max_tokens=10, temperature=0.7, top_k=1, seed=5))[0].outputs[0].token_ids
    assert g == k1


def test_stop_token_and_stop_string(llm):
    p = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    base = llm.generate("stop here", p)[0].outputs[0]
    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    out = llm.generate("stop here", SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_tok]))[0]
    assert out.outputs[0].token_ids == base.token_ids[: first + 1] and out.outputs[0].finish_reason == "stop"
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        o = llm.generate("stop here", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))[0]
        assert o.outputs[0].text == text[: text.index(stop)] and o.outputs[0].finish_reason == "stop"
        assert o.outputs[0].stop_reason == stop
        streamed = "".join(llm.stream("stop here", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                                   stop=[stop])))
        assert streamed == o.outputs[0].text
    assert _all_free(llm)


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(top_k=-2), dict(seed=-1), dict(stop=[""]), dict(max_tokens=1.5)])
def test_bad_sampling_params(kwargs):
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_input_keeps_engine_serving(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [3] * 250}, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [3, 10**6]})
    with pytest.raises(ValueError, match="max_model_len"):  # one bad prompt in a batch: nothing runs
        llm.generate(["fine", {"prompt_token_ids": [3] * 300}])
    with pytest.raises(ValueError, match="messages"):
        llm.chat([])
    assert _all_free(llm)
    assert llm.generate("still works", SamplingParams(max_tokens=3))[0].outputs[0].token_ids


def test_abandoned_stream_frees_blocks(llm):
    it = llm.stream_deltas("abandon me", SamplingParams(max_tokens=50, ignore_eos=True))
    next(it)
    assert any(llm.scheduler.blocks.allocator.refs)
    it.close()
    assert _all_free(llm)
    it2 = llm.stream_deltas("left open", SamplingParams(max_tokens=50, ignore_eos=True))
    first = next(it2)  # left open on this thread: the next request runs beside it, batched
    assert len(llm.generate("next", SamplingParams(max_tokens=4))[0].outputs[0].token_ids) <= 4
    assert llm.stats()["requests_running"] == 1
    rest = list(it2)
    assert len(first.token_ids) + sum(len(d.token_ids) for d in rest) == 50
    assert _all_free(llm)
    it3 = llm.stream_deltas("dropped", SamplingParams(max_tokens=50, ignore_eos=True))
    next(it3)
    del it3  # dropped without closing: cancelled, its blocks free
    assert _all_free(llm)


def test_failure_mid_request_frees_blocks(llm, monkeypatch):
    def boom(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(llm.runner, "decode_step", boom)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate("x", SamplingParams(max_tokens=5))
    monkeypatch.undo()
    assert _all_free(llm) and llm.stats()["requests_failed"] >= 1
    assert llm.generate("x", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_chat_template(llm):
    msgs = [{"role": "user", "content": "hi"}]
    ids = llm.encode_chat(msgs)
    assert ids == llm.tokenizer(llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                                    tokenize=False), add_special_tokens=False)["input_ids"]
    assert llm.chat(msgs, SamplingParams(max_tokens=3)).prompt_token_ids == ids


def test_bad_engine_options(tmp_path):
    with pytest.raises(ValueError, match="unknown preset|neither a preset"):
        LLM("no-such-preset-or-dir")
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(str(tmp_path))
    with pytest.raises(TypeError, match="unknown EngineConfig option"):
        LLM("tiny-llama", block_sz=16)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="float8")
    with pytest.raises(ValueError, match="capture"):
        EngineConfig(capture="sometimes")
    with pytest.raises(ValueError, match="batch_invariant='yes' must be True or False"):
        EngineConfig(batch_invariant="yes")
    for bad in ((0, 4), (4, 2), (16, 64), (), 16, (True,)):
        with pytest.raises(ValueError, match=r"must be strictly increasing ints in \[1, max_num_seqs=32\]"):
            EngineConfig(decode_buckets=bad)
    assert EngineConfig(decode_buckets=[1, 16]).decode_buckets == (1, 16)


def test_corrupt_checkpoint_names_file(tmp_path):
    from hybrid_engine.models.presets import build_hf_model

    model, tok = build_hf_model("tiny-llama")
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ValueError, match="supported"):
        LLM(str(tmp_path))


def test_stop_reason_travels_with_the_last_delta(llm):
    p = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    base = llm.generate("reason", p)[0].outputs[0]
    tok = base.token_ids[3]
    deltas = list(llm.stream_deltas("reason", SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[tok])))
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == tok
    assert all(d.stop_reason is None for d in deltas[:-1])


@pytest.mark.parametrize("bad", [0, -1, 257, 2.0, True])
def test_bad_max_num_seqs_is_rejected_clearly(bad):
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=bad)


def test_kv_cache_too_small_for_one_request_is_rejected_at_construction():
    with pytest.raises(ValueError, match=r"num_kv_blocks=3 .*max_model_len=256.*needs 17 blocks"):
        LLM("tiny-llama", max_model_len=256, num_kv_blocks=3)


def test_block_allocator_rejects_a_bad_free_and_loses_nothing():
    from hybrid_engine.errors import HybridEngineError
    from hybrid_engine.engine.block_manager import BlockAllocator

    a = BlockAllocator(6)
    blocks = a.allocate(3)
    for bad in ([blocks[0], blocks[0]], [blocks[1], 5], [99]):
        with pytest.raises(HybridEngineError, match="freed twice or never allocated"):
            a.free(bad)
        assert a.num_free == 3  # nothing freed by a rejected call
    a.free(blocks)
    assert a.num_free == 6 and sorted(a.allocate(6)) == list(range(6))
