"""Server behaviour against a scripted fake engine (fast, deterministic): errors, queueing, cancellation.

The real-engine, real-process tests are in test_server_e2e.py; these pin down the HTTP contract precisely, in
particular the engine-failure path (500 for one request) that a healthy engine cannot be made to produce.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from hybrid_engine.outputs import RequestMetrics, StreamDelta  # noqa: E402
from hybrid_engine.server import create_app  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class FakeLLM:
    """Emits "w0 w1 ..." one word per token through the async API; 'boom' raises mid-engine; a gate can hold
    generation."""

    def __init__(self, total_blocks: int = 8) -> None:
        self.config = SimpleNamespace(model="fake", capture="off", max_model_len=64)
        self.total_blocks = total_blocks
        self.held = 0
        self.gate = threading.Event()
        self.gate.set()
        self.token_delay_s = 0.0
        self.lock = threading.Lock()

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return [len(m["content"]) + 1 for m in messages]

    def stats(self) -> dict[str, Any]:
        return {"kv_blocks_total": self.total_blocks, "kv_blocks_free": self.total_blocks - self.held,
                "kv_blocks_cached": 0,
                "graphs_captured": 0, "graphs_pending": 0, "graphs_failed": 0, "device": "cpu"}

    async def astream_deltas(self, prompt: Any, params: Any) -> AsyncIterator[StreamDelta]:
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt.split()
        if len(ids) + params.max_tokens > 64:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds max_model_len=64")
        if prompt == "boom":
            raise RuntimeError("injected engine failure")
        self.held += 1
        try:
            for i in range(params.max_tokens):
                while not self.gate.is_set():
                    await asyncio.sleep(0.01)
                await asyncio.sleep(self.token_delay_s)
                last = i == params.max_tokens - 1
                metrics = RequestMetrics(prompt_tokens=len(ids), generated_tokens=i + 1) if last else None
                yield StreamDelta(f"w{i} ", [i], "length" if last else None, metrics)
        finally:
            self.held -= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(llm: FakeLLM, **app_kw: Any) -> Iterator[str]:
    app = create_app(llm, served_model_name="fake", max_queue=2, **app_kw)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        llm.gate.set()
        server.should_exit = True
        thread.join(10)


@pytest.fixture()
def served() -> Iterator[tuple[FakeLLM, str]]:
    llm = FakeLLM()
    with _serving(llm) as base:
        yield llm, base


def _post(base: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=10, **kw)


def test_completion_and_chat_json(served: tuple[FakeLLM, str]) -> None:
    _, base = served
    r = _post(base, "/v1/completions", {"model": "fake", "prompt": "a b", "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == "w0 w1 w2 "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    r = _post(base, "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                             "max_completion_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 ", "refusal": None}


def test_streaming_chunks_and_usage(served: tuple[FakeLLM, str]) -> None:
    _, base = served
    body = {"model": "fake", "prompt": "x", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "w0 w1 w2 "
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"model": "fake", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": "fake", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "fake", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "fake", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "fake", "prompt": "x", "n": 2}, "n"),
    ({"model": "fake", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "fake", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "fake", "prompt": "x", "logprobs": 3}, "logprobs"),
    ({"model": "fake", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "fake"}, "prompt"),
    ({"prompt": "x", "max_tokens": 1}, "model"),  # OpenAI requires `model`
    ({"model": "fake", "prompt": "x " * 70}, None),
])
def test_bad_requests_are_400(served: tuple[FakeLLM, str], body: Any, param: str | None) -> None:
    _, base = served
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    r = httpx.post(base + "/v1/completions", timeout=10, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err


def test_unknown_model_404_and_unknown_field_ignored(served: tuple[FakeLLM, str]) -> None:
    _, base = served
    r = _post(base, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _post(base, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 1, "frobnicate": 3})
    assert r.status_code == 200


def test_engine_error_is_500_for_that_request_only(served: tuple[FakeLLM, str]) -> None:
    _, base = served
    r = _post(base, "/v1/completions", {"model": "fake", "prompt": "boom"})
    assert r.status_code == 500 and "injected engine failure" in r.json()["error"]["message"]
    r = _post(base, "/v1/completions", {"model": "fake", "prompt": "fine", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "w0 w1 "


def test_full_queue_429_with_retry_after(served: tuple[FakeLLM, str]) -> None:
    llm, base = served
    llm.gate.clear()
    results: list[int] = []
    body = {"model": "fake", "prompt": "x", "max_tokens": 1}
    threads = [threading.Thread(target=lambda: results.append(_post(base, "/v1/completions", body).status_code))
               for _ in range(3)]
    for t in threads:  # 1 running (held at the gate) + 2 queued = the bound
        t.start()
        time.sleep(0.2)
    r = _post(base, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    llm.gate.set()
    for t in threads:
        t.join(10)
    assert results == [200, 200, 200]


def test_disconnect_mid_stream_cancels(served: tuple[FakeLLM, str]) -> None:
    llm, base = served
    llm.token_delay_s = 0.05
    body = {"model": "fake", "prompt": "x", "max_tokens": 60, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = time.time() + 5
    while llm.held and time.time() < deadline:
        time.sleep(0.02)
    assert llm.held == 0
    metrics = httpx.get(base + "/metrics").text
    assert "hybrid_engine_requests_in_flight 0.0" in metrics
    assert "hybrid_engine_requests_cancelled_total 1.0" in metrics


def test_health_models_metrics(served: tuple[FakeLLM, str]) -> None:
    _, base = served
    h = httpx.get(base + "/health").json()
    assert h["status"] == "ok" and h["capture"]["graphs_failed"] == 0 and h["queue"]["max_queue"] == 2
    m = httpx.get(base + "/v1/models").json()
    assert m["data"][0]["id"] == "fake"
    text = httpx.get(base + "/metrics").text
    for name in ("hybrid_engine_kv_blocks_free 8.0", "hybrid_engine_requests_queued 0.0",
                 "hybrid_engine_graphs_pending 0.0", "hybrid_engine_time_to_first_token_seconds_bucket"):
        assert name in text
    assert httpx.get(base + "/nope").json()["error"]["type"] == "not_found_error"


def test_non_streaming_client_timeout_cancels(served: tuple[FakeLLM, str]) -> None:
    llm, base = served
    llm.token_delay_s = 0.05
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 60}, timeout=0.5)
    deadline = time.time() + 5
    while llm.held and time.time() < deadline:
        time.sleep(0.02)
    assert llm.held == 0
    assert "hybrid_engine_requests_in_flight 0.0" in httpx.get(base + "/metrics").text


def test_unstarted_request_at_shutdown_is_503() -> None:
    llm = FakeLLM()
    llm.gate.clear()
    app = create_app(llm, max_queue=2)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    state = app.state.server
    codes: list[int] = []
    workers = [threading.Thread(target=lambda: codes.append(_post(
        f"http://127.0.0.1:{port}", "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 5}).status_code))
        for _ in range(2)]
    for w in workers:
        w.start()
    while state.worker.queued() < 1:
        time.sleep(0.02)
    state.worker.stop(timeout_s=0.1)  # what the lifespan does at shutdown: running and queued requests get 503
    llm.gate.set()
    for w in workers:
        w.join(10)
    server.should_exit = True
    thread.join(10)
    assert codes == [503, 503], codes


class SpyTokenizer:
    """Counts its calls; its longest vocabulary entry is 4 characters."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str) -> dict[str, list[int]]:
        self.calls += 1
        return {"input_ids": list(range(len(text.split())))}

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "abcd": 1}


def _spied_llm() -> tuple[FakeLLM, list[int]]:
    llm = FakeLLM()
    llm.tokenizer = SpyTokenizer()
    chat_calls: list[int] = []
    encode_chat = llm.encode_chat
    llm.encode_chat = lambda messages: chat_calls.append(1) or encode_chat(messages)
    return llm, chat_calls


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_oversized_body_is_413_and_never_tokenized(path: str) -> None:
    llm, chat_calls = _spied_llm()
    huge = "x" * 3_000_000
    body = {"model": "fake", "prompt": huge} if "chat" not in path else \
        {"model": "fake", "messages": [{"role": "user", "content": huge}]}
    with _serving(llm, max_request_bytes=4096) as base:
        r = _post(base, path, body)
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert "4096" in err["message"] and "--max-request-bytes" in err["message"]
        assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
        assert llm.tokenizer.calls == 0 and chat_calls == []
        ok = _post(base, path, {"model": "fake", "prompt": "a b", "max_tokens": 1} if "chat" not in path else
                   {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert ok.status_code == 200, ok.text  # the connection pool and the server are fine afterwards


def test_oversized_body_without_content_length_is_413_while_streaming() -> None:
    llm, _ = _spied_llm()

    def chunks() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
        yield b'{"model": "fake", "prompt": "'
        for _ in range(64):
            yield b"y" * 65536
        yield b'"}'

    with _serving(llm, max_request_bytes=100_000) as base:
        r = httpx.post(base + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                       timeout=10)
    assert r.status_code == 413, r.text
    assert "100000" in r.json()["error"]["message"]
    assert llm.tokenizer.calls == 0


def test_declared_oversized_body_is_answered_before_it_is_sent() -> None:
    llm, _ = _spied_llm()
    with _serving(llm, max_request_bytes=4096) as base, socket.create_connection(
            ("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=5) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000000\r\n\r\n")  # headers only: the 50 MB never come
        reply = _read_response(conn)
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "4096" in reply and llm.tokenizer.calls == 0


def _read_response(conn: socket.socket) -> str:
    """Status line, headers and the whole body (it may arrive in a separate segment)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_prompt_over_the_character_cap_is_400_before_tokenizing() -> None:
    llm, chat_calls = _spied_llm()
    with _serving(llm) as base:  # cap derived: max_model_len 64 x longest vocab entry 4 x 2 = 512 characters
        r = _post(base, "/v1/completions", {"model": "fake", "prompt": "z" * 513})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "max_prompt_chars=512" in r.json()["error"]["message"]
        messages = [{"role": "user", "content": "z" * 300}, {"role": "user", "content": "z" * 300}]
        r = _post(base, "/v1/chat/completions", {"model": "fake", "messages": messages})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert llm.tokenizer.calls == 0 and chat_calls == []
        r = _post(base, "/v1/completions", {"model": "fake", "prompt": "z" * 512, "max_tokens": 1})
        assert r.status_code == 200 and llm.tokenizer.calls == 1, r.text


@pytest.mark.parametrize(("message", "status"), [
    ({"role": "user"}, 400),
    ({"role": "user", "content": None}, 400),
    ({"role": "system"}, 400),
    ({"role": "tool"}, 400),
    ({"role": "assistant"}, 400),
    ({"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                           "function": {"name": "f", "arguments": "{}"}}]}, 200),
    ({"role": "assistant", "content": ""}, 200),
])
def test_chat_message_content_as_openai(served: tuple[FakeLLM, str], message: dict, status: int) -> None:
    _, base = served
    messages = [{"role": "user", "content": "hi"}, message, {"role": "user", "content": "and?"}]
    r = _post(base, "/v1/chat/completions", {"model": "fake", "messages": messages, "max_tokens": 1})
    assert r.status_code == status, r.text
    if status == 400:
        err = r.json()["error"]
        assert err["param"] == "messages.1" and "content" in err["message"] and message["role"] in err["message"]


def test_chat_without_model_is_400(served: tuple[FakeLLM, str]) -> None:
    _, base = served
    r = _post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert "required" in r.json()["error"]["message"]


def test_runs_max_num_seqs_at_once_and_a_queued_disconnect_frees_its_place() -> None:
    llm = FakeLLM()
    llm.config.max_num_seqs = 2
    llm.gate.clear()
    with _serving(llm) as base:  # 2 running + max_queue=2 waiting
        codes: list[int] = []
        body = {"model": "fake", "prompt": "x", "max_tokens": 1}
        running = [threading.Thread(target=lambda: codes.append(_post(base, "/v1/completions", body)
                                                                      .status_code)) for _ in range(2)]
        for t in running:
            t.start()
        deadline = time.time() + 5
        while llm.held < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert llm.held == 2  # both in the engine at once, neither waits for the other
        with pytest.raises(httpx.ReadTimeout):  # a queued client gives up
            httpx.post(base + "/v1/completions", json=body, timeout=0.3)
        health = httpx.get(base + "/health").json()["queue"]
        assert health["running"] == 2 and health["queued"] == 0, health
        llm.gate.set()
        for t in running:
            t.join(10)
        assert codes == [200, 200]
        assert "hybrid_engine_requests_cancelled_total 1.0" in httpx.get(base + "/metrics").text
