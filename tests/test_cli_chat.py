"""`hybrid-engine chat` and `generate`'s chat template, on tiny-llama (its tokenizer has a chat template)."""
import io

import pytest

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.chat_repl import ChatHistory, run_chat
from hybrid_engine.cli import build_parser, main, model_for_device

PARAMS = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def llm():
    engine = LLM("tiny-llama", device="cpu", max_model_len=256)
    yield engine
    engine.close()


def _reply(llm, messages):
    return llm.chat(messages, PARAMS).outputs[0].text


def test_repl_keeps_history_and_resets(llm):
    stdin = io.StringIO("hi there\nand now?\n/reset\nand now?\n/exit\nnever read\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    assert run_chat(llm, PARAMS, stdin, stdout, stderr) == 0
    first = _reply(llm, [{"role": "user", "content": "hi there"}])
    second = _reply(llm, [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "and now?"}])
    fresh = _reply(llm, [{"role": "user", "content": "and now?"}])
    assert second != fresh  # the history changes the reply, so the comparison below sees it
    assert stdout.getvalue() == f"{first}\n{second}\n{fresh}\n"
    assert "[history cleared]" in stderr.getvalue() and stdin.readline() == "never read\n"


def test_repl_ends_at_end_of_input_and_names_unknown_commands(llm):
    stdout, stderr = io.StringIO(), io.StringIO()
    assert run_chat(llm, PARAMS, io.StringIO("/help\nhello"), stdout, stderr) == 0
    assert "unknown command '/help'" in stderr.getvalue()
    assert stdout.getvalue() == _reply(llm, [{"role": "user", "content": "hello"}]) + "\n"


def test_history_drops_oldest_exchanges_to_fit(llm):
    history = ChatHistory(system="be brief")
    for i in range(40):
        history.add(f"question {i} " * 3, f"answer {i} " * 3)
    ids = history.prompt_ids(llm, "last question", max_tokens=64)
    assert len(ids) + 64 <= llm.max_model_len
    assert history.turns and history.turns[-1]["content"] == "answer 39 " * 3
    assert history.turns[0]["content"] != "question 0 " * 3
    with pytest.raises(ValueError, match="does not fit in max_model_len=256"):
        history.prompt_ids(llm, "x " * 300, max_tokens=8)


@pytest.mark.parametrize("chat", [True, False])
def test_generate_applies_the_chat_template_unless_told_not_to(llm, capsys, chat):
    args = ["generate", "Tell me a story", "--model", "tiny-llama", "--device", "cpu", "--max-tokens", "6",
            "--capture", "off"]
    assert main(args + ([] if chat else ["--no-chat"])) == 0
    templated = _reply(llm, [{"role": "user", "content": "Tell me a story"}])
    raw = llm.generate("Tell me a story", PARAMS)[0].outputs[0].text
    assert templated != raw
    assert capsys.readouterr().out == (templated if chat else raw) + "\n"


def test_generate_reports_a_load_error_in_one_line(capsys):
    assert main(["generate", "hi", "--model", "/nonexistent/model.gguf", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GGUF file '/nonexistent/model.gguf' does not exist" in err


def test_the_real_model_is_the_default_of_generate_and_chat():
    for command in (["generate", "hi"], ["chat"]):
        assert model_for_device(build_parser().parse_args([*command, "--device", "cpu"])) == "smollm2-135m-instruct"


def test_decode_is_batch_invariant_unless_turned_off():
    """The engine, the CLI and the server default to the batch-invariant decode projections; --no-batch-invariant
    (the one-row GEMVs) reaches the engine from both."""
    from hybrid_engine.config import EngineConfig
    from hybrid_engine.server.app import build_parser as server_parser, engine_kwargs

    assert EngineConfig().batch_invariant is True
    assert build_parser().parse_args(["generate", "hi"]).batch_invariant is True
    assert build_parser().parse_args(["generate", "hi", "--no-batch-invariant"]).batch_invariant is False
    assert "batch_invariant" not in engine_kwargs(server_parser().parse_args(["--model", "tiny-llama"]))
    assert engine_kwargs(server_parser().parse_args(["--model", "tiny-llama", "--no-batch-invariant"]))[
        "batch_invariant"] is False
