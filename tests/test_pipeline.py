"""hybrid_engine.pipeline(engine="hybrid") against the stock transformers pipeline on the same weights (greedy)."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TextGenerationPipeline, TextIteratorStreamer

from transformers.generation.streamers import BaseStreamer

from hybrid_engine import LLM, SamplingParams, pipeline
from hybrid_engine.adapters.pipeline import _engine_device

GREEDY = dict(max_new_tokens=16, do_sample=False)
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return LLM("tiny-llama", device="cpu", max_model_len=64).tokenizer


@pytest.fixture(scope="module")
def hf_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def hybrid(hf_model, tokenizer):
    return pipeline("text-generation", model=hf_model, tokenizer=tokenizer, device="cpu")


@pytest.fixture(scope="module")
def stock(hf_model, tokenizer):
    return pipeline("text-generation", model=hf_model, tokenizer=tokenizer, engine="transformers", device="cpu")


def new_ids(pipe, prompt, **kwargs) -> list[int]:
    out = pipe(prompt, return_tensors=True, **GREEDY, **kwargs)[0]["generated_token_ids"]
    return out[len(pipe.tokenizer(prompt)["input_ids"]):]


def test_hybrid_is_a_transformers_text_generation_pipeline(hybrid, stock):
    assert isinstance(hybrid, TextGenerationPipeline) and type(hybrid).__name__ == "HybridTextGenerationPipeline"
    assert type(stock) is TextGenerationPipeline
    assert type(hybrid.model).__name__ == "HybridModelForCausalLM" and hybrid.device.type == "cpu"


@pytest.mark.parametrize("inputs", [
    "Hello there",
    ["a b c", "The quick brown fox"],
    CHAT,
    [CHAT, [{"role": "user", "content": "Hi!"}]],
    CHAT + [{"role": "assistant", "content": "Blu"}],  # ends with the assistant: continue_final_message
], ids=["string", "list", "chat", "list-of-chats", "chat-prefill"])
def test_greedy_generated_text_equals_transformers(hybrid, stock, inputs):
    assert hybrid(inputs, **GREEDY) == stock(inputs, **GREEDY)


def test_return_full_text_and_tensors_equal_transformers(hybrid, stock):
    kw = dict(return_full_text=False, **GREEDY)
    assert hybrid("Once upon", **kw) == stock("Once upon", **kw)
    assert new_ids(hybrid, "Once upon") == new_ids(stock, "Once upon")


def test_batched_left_padded_prompts_equal_transformers(hybrid, stock):
    prompts = ["x", "A much longer prompt than the first"]
    assert hybrid(prompts, batch_size=2, **GREEDY) == stock(prompts, batch_size=2, **GREEDY)


def _batched_rows(pipe) -> int:
    return sum(k * v for k, v in pipe.model.llm.stats()["decode_batch_sizes"].items() if k > 1)


def test_a_list_of_inputs_runs_batched_with_outputs_as_one_at_a_time(hybrid):
    prompts = ["a b c", "The quick brown fox", "Once upon", "x", "A much longer prompt than the first"]
    chats = [CHAT, [{"role": "user", "content": "Hi!"}], [{"role": "user", "content": "Name a number."}]]
    kw = dict(max_new_tokens=24, do_sample=False)
    alone = [hybrid(p, **kw) for p in prompts]
    alone_chats = [hybrid(c, **kw) for c in chats]
    alone_ids = [hybrid(p, return_tensors=True, **kw) for p in prompts]
    before = _batched_rows(hybrid)
    assert hybrid(prompts, **kw) == alone
    assert _batched_rows(hybrid) > before  # generated together, not one after another
    assert hybrid(chats, **kw) == alone_chats
    assert hybrid(prompts, return_tensors=True, **kw) == alone_ids


def test_eos_token_id_stops_like_transformers(hybrid, stock):
    ids = new_ids(stock, "Hello there")
    eos = ids[5]  # a token the greedy run emits: both must stop there and keep it
    stopped = new_ids(hybrid, "Hello there", eos_token_id=eos)
    assert stopped == new_ids(stock, "Hello there", eos_token_id=eos) == ids[:ids.index(eos) + 1]


def test_stop_strings_stop_like_transformers(hybrid, stock, tokenizer):
    text = stock("Hello there", return_full_text=False, **GREEDY)[0]["generated_text"]
    stop = text[5:7]
    a = hybrid("Hello there", stop_sequence=stop, **GREEDY)
    assert a == stock("Hello there", stop_sequence=stop, **GREEDY)
    assert a == hybrid("Hello there", stop_strings=[stop], tokenizer=tokenizer, **GREEDY)
    assert stop in a[0]["generated_text"] and len(a[0]["generated_text"]) < len("Hello there" + text)


def _stream_text(pipe, tokenizer, prompt, **kwargs) -> tuple[list[str], list]:
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    result = []
    worker = threading.Thread(target=lambda: result.append(pipe(prompt, streamer=streamer, **GREEDY, **kwargs)))
    worker.start()
    pieces = list(streamer)
    worker.join()
    return pieces, result[0]


@pytest.mark.parametrize("prompt", ["Hello there", CHAT], ids=["string", "chat"])
def test_text_iterator_streamer_text_equals_transformers(hybrid, stock, tokenizer, prompt):
    pieces, out = _stream_text(hybrid, tokenizer, prompt, return_full_text=False)
    stock_pieces, stock_out = _stream_text(stock, tokenizer, prompt, return_full_text=False)
    assert "".join(pieces) == "".join(stock_pieces)
    assert out == stock_out


class RecordingStreamer(BaseStreamer):
    """A real transformers streamer that keeps what generate() hands it."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


def test_streamer_gets_prompt_then_each_token_then_end(hybrid, stock):
    mine, theirs = RecordingStreamer(), RecordingStreamer()
    hybrid("Hello there", streamer=mine, **GREEDY)
    stock("Hello there", streamer=theirs, **GREEDY)
    assert len(mine.puts) == 1 + GREEDY["max_new_tokens"] and mine.ended == 1
    assert mine.puts == theirs.puts and theirs.ended == 1


def test_model_generate_returns_ids_like_transformers(hybrid, hf_model, tokenizer):
    enc = tokenizer("Hello there", return_tensors="pt")
    streamer = RecordingStreamer()
    ours = hybrid.model.generate(**enc, max_new_tokens=12, do_sample=False, streamer=streamer)
    theirs = hf_model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert streamer.puts[0] == enc["input_ids"].tolist() and len(streamer.puts) == 13
    assert torch.equal(hybrid.model.generate(enc["input_ids"], max_new_tokens=12, do_sample=False), theirs)


def test_sampling_is_reproducible_with_torch_seed(hybrid):
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=40, top_p=0.95)
    torch.manual_seed(7)
    a = hybrid("Hello there", **kw)
    torch.manual_seed(7)
    assert hybrid("Hello there", **kw) == a


def test_generation_defaults_given_at_construction(hf_model, tokenizer):
    pipe = pipeline("text-generation", model=hf_model, tokenizer=tokenizer, max_new_tokens=5, do_sample=False,
                    return_full_text=False)
    out = pipe("Hello", return_tensors=True)[0]["generated_token_ids"]
    assert len(out) == len(tokenizer("Hello")["input_ids"]) + 5


def test_generation_config_options_the_engine_lacks_are_reported(hybrid, stock):
    from transformers import GenerationConfig

    config = GenerationConfig(repetition_penalty=1.2, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"repetition_penalty=1\.2"):
        hybrid("Hello", generation_config=config)
    hybrid.model.generation_config.repetition_penalty = 1.1  # as a checkpoint's generation_config.json may set
    try:
        with pytest.raises(ValueError, match=r"generation_config sets \['repetition_penalty=1\.1'\]"):
            hybrid("Hello", **GREEDY)
        assert hybrid("Hello", repetition_penalty=1.0, **GREEDY) == stock("Hello", **GREEDY)
    finally:
        hybrid.model.generation_config.repetition_penalty = None


def test_pipeline_from_a_preset_name_on_both_engines():
    pipe = pipeline("text-generation", model="tiny-llama", device="cpu", engine_kwargs={"max_model_len": 256})
    llm = pipe.model.llm
    want = llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    assert pipe("Hello", max_new_tokens=8, do_sample=False)[0]["generated_text"] == "Hello" + want
    stock = pipeline("text-generation", model="tiny-llama", engine="transformers", device="cpu")
    assert type(stock) is TextGenerationPipeline
    for inputs in ("Hello", CHAT):
        assert stock(inputs, max_new_tokens=8, do_sample=False) == pipe(inputs, max_new_tokens=8, do_sample=False)
    with pytest.raises(ValueError, match="only apply to engine='hybrid'"):
        pipeline("text-generation", model="tiny-llama", engine="transformers", engine_kwargs={"capture": "off"})
    with pytest.raises(ValueError, match="not a hybrid_engine.LLM"):
        pipeline("text-generation", model=llm, engine="transformers")


def test_pipeline_over_an_existing_llm():
    llm = LLM("tiny-llama", device="cpu", max_model_len=64)
    pipe = pipeline("text-generation", model=llm)
    want = llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0))[0]
    got = pipe("Hello", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert got == llm.tokenizer.decode(want.outputs[0].token_ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="already built LLM"):
        pipeline("text-generation", model=llm, max_model_len=32, model_kwargs={"capture": "off"})


# ---------------- bad input -> clear errors ----------------

@pytest.mark.parametrize("kwargs, named", [
    (dict(num_beams=4), "num_beams=4"),
    (dict(repetition_penalty=1.3), "repetition_penalty=1.3"),
    (dict(num_return_sequences=2), "num_return_sequences=2"),
    (dict(output_scores=True, return_dict_in_generate=True), "output_scores=True"),
    (dict(no_such_option=1), "no_such_option"),
])
def test_unsupported_generate_kwargs_are_named(hybrid, kwargs, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        hybrid("Hello", **kwargs)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        hybrid.model.generate(torch.tensor([[1, 5, 6]]), **kwargs)


def test_unsupported_kwargs_at_construction_are_named(hf_model, tokenizer):
    with pytest.raises(ValueError, match="num_beams=3"):
        pipeline("text-generation", model=hf_model, tokenizer=tokenizer, num_beams=3)
    with pytest.raises(ValueError, match="assistant_model"):
        pipeline("text-generation", model=hf_model, tokenizer=tokenizer, assistant_model=hf_model)


def test_noop_values_of_unsupported_options_are_accepted(hybrid, stock):
    kw = dict(num_beams=1, use_cache=True, repetition_penalty=1.0, num_return_sequences=1, **GREEDY)
    assert hybrid("Hello", **kw) == stock("Hello", **kw)


@pytest.mark.parametrize("task, message", [
    ("text-generaton", "unknown task 'text-generaton'"),
    ("text-classification", "task 'text-classification' is not supported by engine='hybrid'"),
    (None, "unknown task None"),
])
def test_bad_task(hf_model, task, message):
    with pytest.raises(ValueError, match=message):
        pipeline(task, model=hf_model)


def test_bad_engine_and_missing_model(hf_model):
    with pytest.raises(ValueError, match="engine='vllm'"):
        pipeline("text-generation", model=hf_model, engine="vllm")
    with pytest.raises(ValueError, match="needs model="):
        pipeline("text-generation")


@pytest.mark.parametrize("inputs, message", [([], "empty input"), ([[]], "empty chat"), (None, "inputs is None")])
def test_empty_inputs(hybrid, inputs, message):
    with pytest.raises(ValueError, match=message):
        hybrid(inputs, **GREEDY)


def test_streamer_with_a_batch_is_an_error(hybrid, tokenizer):
    with pytest.raises(ValueError, match="batch of one"):
        hybrid.model.generate(torch.tensor([[1, 5], [1, 6]]), streamer=RecordingStreamer(), max_new_tokens=2)


def test_empty_input_ids_is_an_error(hybrid):
    with pytest.raises(ValueError, match="input_ids is empty"):
        hybrid.model.generate(torch.zeros((1, 0), dtype=torch.long), max_new_tokens=2)


def test_device_and_device_map_translation():
    assert _engine_device(-1, None) == "cpu" and _engine_device("cpu", None) == "cpu"
    assert _engine_device(0, None) == "cuda" and _engine_device(None, {"": "cuda:0"}) == "cuda"
    assert _engine_device(None, "auto") is None and _engine_device(None, None) is None
    with pytest.raises(ValueError, match="one device"):
        _engine_device(None, {"model.layers.0": 0, "model.layers.1": "cpu"})
    with pytest.raises(ValueError, match="cuda:1"):
        _engine_device("cuda:1", None)
    with pytest.raises(ValueError, match="not both"):
        _engine_device("cpu", "auto")
