"""Server behaviour against a scripted fake engine (fast, deterministic): errors, queueing, cancellation.

The real-engine, real-process tests are in test_server_e2e.py; these pin down the HTTP contract precisely, in
particular the engine-failure path (500 for one request) that a healthy engine cannot be made to produce.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
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
    """Emits "w0 w1 ..." one word per token; 'boom' raises mid-engine; a gate can hold generation."""

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
                "graphs_captured": 0, "graphs_pending": 0, "graphs_failed": 0, "device": "cpu"}

    def stream_deltas(self, prompt: Any, params: Any) -> Iterator[StreamDelta]:
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt.split()
        if len(ids) + params.max_tokens > 64:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds max_model_len=64")
        if prompt == "boom":
            raise RuntimeError("injected engine failure")
        self.held += 1
        try:
            for i in range(params.max_tokens):
                self.gate.wait()
                time.sleep(self.token_delay_s)
                last = i == params.max_tokens - 1
                metrics = RequestMetrics(prompt_tokens=len(ids), generated_tokens=i + 1) if last else None
                yield StreamDelta(f"w{i} ", [i], "length" if last else None, metrics)
        finally:
            self.held -= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def served() -> Iterator[tuple[FakeLLM, str]]:
    llm = FakeLLM()
    app = create_app(llm, served_model_name="fake", max_queue=2)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    yield llm, f"http://127.0.0.1:{port}"
    llm.gate.set()
    server.should_exit = True
    thread.join(10)


def _post(base: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=10, **kw)


def test_completion_and_chat_json(served: tuple[FakeLLM, str]) -> None:
    _, base = served
    r = _post(base, "/v1/completions", {"model": "fake", "prompt": "a b", "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == "w0 w1 w2 "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    r = _post(base, "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                             "max_completion_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 ", "refusal": None}


def test_streaming_chunks_and_usage(served: tuple[FakeLLM, str]) -> None:
    _, base = served
    body = {"prompt": "x", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
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
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "logprobs": 3}, "logprobs"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x " * 70}, None),
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
    r = _post(base, "/v1/completions", {"prompt": "x", "max_tokens": 1, "frobnicate": 3})
    assert r.status_code == 200


def test_engine_error_is_500_for_that_request_only(served: tuple[FakeLLM, str]) -> None:
    _, base = served
    r = _post(base, "/v1/completions", {"prompt": "boom"})
    assert r.status_code == 500 and "injected engine failure" in r.json()["error"]["message"]
    r = _post(base, "/v1/completions", {"prompt": "fine", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "w0 w1 "


def test_full_queue_429_with_retry_after(served: tuple[FakeLLM, str]) -> None:
    llm, base = served
    llm.gate.clear()
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        _post(base, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code)) for _ in range(3)]
    for t in threads:  # 1 running (held at the gate) + 2 queued = the bound
        t.start()
        time.sleep(0.2)
    r = _post(base, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    llm.gate.set()
    for t in threads:
        t.join(10)
    assert results == [200, 200, 200]


def test_disconnect_mid_stream_cancels(served: tuple[FakeLLM, str]) -> None:
    llm, base = served
    llm.token_delay_s = 0.05
    body = {"prompt": "x", "max_tokens": 60, "stream": True}
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
        httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 60}, timeout=0.5)
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
        f"http://127.0.0.1:{port}", "/v1/completions", {"prompt": "x", "max_tokens": 5}).status_code))
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
