"""End-to-end: a real `python -m hybrid_engine.server` process on 127.0.0.1, spoken to over HTTP.

Greedy text from the server (official `openai` client, streaming and not) must equal `LLM.generate` / `LLM.chat`
in-process on the same preset. Load, memory, disconnect, queue-full and malformed-body tests each end by checking
the server is alive and still correct. One server process serves the whole module (model load is ~10 s on CPU).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from block_helpers import blocks_settled, metrics_blocks_settled

from benchmarks.load import wait_ready

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from hybrid_engine import LLM, SamplingParams  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MODEL = "tiny-llama"
MAX_MODEL_LEN = 256
MAX_QUEUE = 16
RSS_GROWTH_BOUND_MB = 24  # resident memory may grow at most this much over 500 requests after warm-up
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time", "def main():", "1, 2, 3,",
           "Paris is the capital of", "abc", "To be or not to be"]
CHATS = [[{"role": "user", "content": "hi there"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]]
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m hybrid_engine.server` in a subprocess on a free port; stdout/stderr go to a log file."""

    def __init__(self, tmp: Path, model: str = MODEL, max_model_len: int = MAX_MODEL_LEN,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "server.log"
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, "-m", "hybrid_engine.server", "--model", model, "--port", str(self.port),
               "--max-model-len", str(max_model_len), "--max-queue", str(MAX_QUEUE), "--max-num-seqs", "1",
               "--no-access-log",
               "--log-level", "warning", *extra]
        self._log = self.log_path.open("wb")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=120)

    def wait_ready(self, timeout_s: float = 150) -> None:
        wait_ready(self.proc, self.base, timeout_s, self.log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        return {s.name + _labels(s.labels): s.value for fam in text_string_to_metric_families(text)
                for s in fam.samples}

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is the clean exit
        assert self.proc.returncode in (0, -signal.SIGTERM), f"server did not shut down cleanly on SIGTERM:\n{self.log()}"


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("server"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def llm(server: Server) -> Iterator[LLM]:
    """The in-process reference (loaded while the server process loads its own copy)."""
    engine = LLM(MODEL, max_model_len=MAX_MODEL_LEN)
    yield engine
    engine.close()


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def expected(llm: LLM) -> dict[str, str]:
    """Greedy 4-token completions of PROMPTS, the reference for the load tests."""
    outs = llm.generate(PROMPTS, greedy(4))
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}


@pytest.fixture(scope="module")
def expected_chat(llm: LLM) -> list[str]:
    return [llm.chat(messages, greedy(4)).outputs[0].text for messages in CHATS]


@pytest.fixture(autouse=True)
def server_alive_afterwards(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" in request.fixturenames:
        srv: Server = request.getfixturevalue("server")
        assert srv.proc.poll() is None, f"server died:\n{srv.log()}"
        assert httpx.get(f"{srv.base}/health", timeout=10).json()["status"] == "ok"


def _complete(srv: Server, prompt: str, max_tokens: int = 4, stream: bool = False) -> str:
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        return srv.client.completions.create(**kw).choices[0].text
    return "".join(c.choices[0].text for c in srv.client.completions.create(stream=True, **kw) if c.choices)


def _wait_idle(srv: Server, timeout_s: float = 30) -> dict[str, float]:
    deadline = time.time() + timeout_s
    while True:
        m = srv.metrics()
        idle = m["hybrid_engine_requests_in_flight"] == 0 and m["hybrid_engine_requests_running"] == 0
        if idle and metrics_blocks_settled(m):
            return m
        assert time.time() < deadline, f"server not idle: {m}"
        time.sleep(0.1)


def test_openai_client_completions_match_generate(server: Server, llm: LLM) -> None:
    for prompt in PROMPTS[:3]:
        ref = llm.generate(prompt, greedy(12))[0]
        resp = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert resp.choices[0].text == ref.outputs[0].text
        assert resp.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert _complete(server, prompt, 12, stream=True) == ref.outputs[0].text


def test_openai_client_chat_matches_llm_chat(server: Server, llm: LLM) -> None:
    for messages in CHATS:
        ref = llm.chat(messages, greedy(10))
        resp = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
        assert resp.choices[0].message.role == "assistant"
        assert resp.choices[0].message.content == ref.outputs[0].text
        assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
        stream = server.client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                                       temperature=0, stream=True,
                                                       stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.outputs[0].text
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == ref.outputs[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_stop_string_and_seeded_sampling(server: Server, llm: LLM) -> None:
    full = llm.generate(PROMPTS[0], greedy(12))[0].outputs[0].text
    stop = full[3:5]
    ref = llm.generate(PROMPTS[0], greedy(12, stop=[stop]))[0].outputs[0]
    resp = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stop=[stop]).choices[0]
    assert (resp.text, resp.finish_reason) == (ref.text, ref.finish_reason)
    kw = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 7,
          "extra_body": {"top_k": 20}}
    ref_text = llm.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, top_k=20,
                                                       seed=7))[0].outputs[0].text
    assert server.client.completions.create(**kw).choices[0].text == ref_text


def test_models_health_and_metrics_endpoints(server: Server) -> None:
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(f"{server.base}/health").json()
    assert set(health["capture"]) >= {"policy", "graphs_captured", "graphs_pending", "graphs_failed"}
    m = server.metrics()
    for name in ("hybrid_engine_time_to_first_token_seconds_count", "hybrid_engine_time_per_output_token_seconds_count",
                 "hybrid_engine_requests_queued", "hybrid_engine_graphs_captured", "hybrid_engine_graphs_pending",
                 "hybrid_engine_graphs_failed", "hybrid_engine_kv_blocks_free"):
        assert name in m, name


def test_reset_prefix_cache_endpoint_drops_cached_prefixes(server: Server) -> None:
    """A repeated prompt reuses its cached blocks (usage.prompt_tokens_details.cached_tokens); after POST
    /reset_prefix_cache the same prompt is prefilled whole again."""
    prompt = " ".join(["token"] * 40)  # several full KV blocks

    def cached() -> int:
        usage = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0).usage
        return usage.prompt_tokens_details.cached_tokens

    cached()
    assert cached() > 0
    r = httpx.post(f"{server.base}/reset_prefix_cache", timeout=30)
    assert r.status_code == 200 and r.json()["blocks_freed"] > 0
    assert cached() == 0


def test_concurrent_streams_are_batched_and_equal_served_alone(tmp_path: Path, llm: LLM) -> None:
    """N streaming clients at once against a server with --max-num-seqs N: each gets the text its request gets
    alone, and the engine decoded them together (decode steps with more than one row)."""
    n = 4
    want = [llm.generate(p, greedy(48, ignore_eos=True))[0].outputs[0].text for p in PROMPTS[:n]]
    srv = Server(tmp_path, extra=("--max-num-seqs", str(n)))
    try:
        srv.wait_ready()
        barrier = threading.Barrier(n)

        def one(i: int) -> str:
            barrier.wait()
            chunks = srv.client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=48, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in chunks if c.choices)

        with ThreadPoolExecutor(n) as pool:
            got = list(pool.map(one, range(n)))
        batched = {k: v for k, v in srv.metrics().items()
                   if k.startswith("hybrid_engine_decode_batch_sizes{") and v > 0}
    finally:
        srv.stop()
    assert got == want
    assert any(int(k.split("=")[1].rstrip("}")) > 1 for k in batched), batched


def _chat(srv: Server, messages: list[dict[str, str]], max_tokens: int = 4, stream: bool = False) -> str:
    kw = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        return srv.client.chat.completions.create(**kw).choices[0].message.content or ""
    chunks = srv.client.chat.completions.create(stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_load_200_requests_16_clients(server: Server, expected: dict[str, str], expected_chat: list[str]) -> None:
    def one(i: int) -> bool:  # a mix: completions and chat, JSON and SSE
        if i % 4 == 3:
            return _chat(server, CHATS[i % 2], 4, stream=i % 8 == 3) == expected_chat[i % 2]
        prompt = PROMPTS[i % len(PROMPTS)]
        return _complete(server, prompt, 4, stream=i % 3 == 0) == expected[prompt]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert sum(results) == 200
    m = _wait_idle(server, timeout_s=5)
    assert m["hybrid_engine_requests_queued"] == 0
    assert m["hybrid_engine_requests_total{endpoint=completions,status=200}"] >= 150
    assert m["hybrid_engine_requests_total{endpoint=chat,status=200}"] >= 50


def test_rss_bounded_over_500_requests(server: Server, expected: dict[str, str]) -> None:
    proc = psutil.Process(server.proc.pid)
    with ThreadPoolExecutor(4) as pool:  # warm-up: every prompt, both paths
        list(pool.map(lambda i: _complete(server, PROMPTS[i % len(PROMPTS)], 1, i % 2 == 0), range(50)))
    rss_before = proc.memory_info().rss

    def one(i: int) -> bool:
        prompt = PROMPTS[i % len(PROMPTS)]
        return expected[prompt].startswith(_complete(server, prompt, 1, stream=i % 2 == 0))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(500)))
    growth_mb = (proc.memory_info().rss - rss_before) / 2**20
    print(f"server RSS {rss_before / 2**20:.0f} MiB -> +{growth_mb:.1f} MiB over 500 requests")
    assert all(results)
    assert growth_mb < RSS_GROWTH_BOUND_MB
    _wait_idle(server, timeout_s=5)


def _open_long_stream(server: Server) -> tuple[httpx.Client, Any, Iterator[str]]:
    """A streaming request that holds the engine (ignore_eos, 200 tokens) until the caller closes it."""
    client = httpx.Client(timeout=60)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": True,
            "temperature": 0}
    ctx = client.stream("POST", f"{server.base}/v1/completions", json=body)
    resp = ctx.__enter__()
    assert resp.status_code == 200
    lines = resp.iter_lines()
    assert next(ln for ln in lines if ln.startswith("data: {"))
    return client, ctx, lines


def test_disconnect_mid_stream_frees_kv_blocks(server: Server, expected: dict[str, str]) -> None:
    before = server.metrics()
    client, ctx, lines = _open_long_stream(server)
    next(ln for ln in lines if ln.startswith("data: {"))
    during = server.metrics()
    assert not metrics_blocks_settled(during)
    assert during["hybrid_engine_requests_running"] == 1
    t0 = time.time()
    ctx.__exit__(None, None, None)
    client.close()
    after = _wait_idle(server, timeout_s=10)
    print(f"blocks freed {time.time() - t0:.2f} s after the disconnect")
    cancelled = "hybrid_engine_requests_cancelled_total"
    assert after[cancelled] == before[cancelled] + 1
    assert after["hybrid_engine_engine_requests_cancelled"] == before["hybrid_engine_engine_requests_cancelled"] + 1
    assert _complete(server, PROMPTS[2]) == expected[PROMPTS[2]]


def test_full_queue_answers_429_then_drains(server: Server, expected: dict[str, str]) -> None:
    client, ctx, _ = _open_long_stream(server)  # the engine is busy: everything else waits in the queue
    with ThreadPoolExecutor(MAX_QUEUE) as pool:
        futures = [pool.submit(_complete, server, PROMPTS[i % len(PROMPTS)]) for i in range(MAX_QUEUE)]
        deadline = time.time() + 30
        while httpx.get(f"{server.base}/health").json()["queue"]["queued"] < MAX_QUEUE:
            assert time.time() < deadline, "queue never filled"
            time.sleep(0.05)
        r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            server.client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError) as too_long:  # validated before queueing: 400 even when full
            server.client.completions.create(model=MODEL, prompt="hello " * 60, max_tokens=8)
        assert too_long.value.code == "context_length_exceeded"
        ctx.__exit__(None, None, None)  # release the engine; the queue drains in FIFO order
        client.close()
        texts = [f.result(timeout=120) for f in futures]
    assert texts == [expected[PROMPTS[i % len(PROMPTS)]] for i in range(MAX_QUEUE)]
    _wait_idle(server)


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model": "tiny-llama", "prompt": "x", ', None),
    (b"not json at all", None),
    (b'"just a string"', None),
    ({"model": MODEL, "prompt": "x", "max_tokens": "4"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "prompt": "x", "n": 3}, "n"),
    ({"model": MODEL, "prompt": 42}, "prompt"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"model": MODEL, "prompt": "hello " * 60, "max_tokens": 8}, "prompt"),  # longer than max_model_len
    ({"model": MODEL, "prompt": list(range(1, 250)), "max_tokens": 8}, "prompt"),
    ({"model": MODEL, "prompt": [999999]}, None),  # token id outside the vocabulary
])
def test_malformed_bodies_answer_400(server: Server, body: Any, param: str | None,
                                     expected: dict[str, str]) -> None:
    kw: dict[str, Any] = {"content": body, "headers": {"Content-Type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server.base}/v1/completions", timeout=30, **kw)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert _complete(server, PROMPTS[3]) == expected[PROMPTS[3]]


def test_malformed_chat_bodies_answer_400(server: Server) -> None:
    bad = [{"model": MODEL, "messages": []},
           {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
           {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
           {"model": MODEL, "messages": "hi"}]
    for body in bad:
        r = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=MODEL, messages=CHATS[0], n=2)
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-4o", messages=CHATS[0])
    long_chat = [{"role": "user", "content": "word " * 80}]
    with pytest.raises(openai.BadRequestError) as too_long:
        server.client.chat.completions.create(model=MODEL, messages=long_chat, max_tokens=8)
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "messages"


class _FailingLLM:
    """Wraps the real engine; a prompt containing FAIL raises inside the engine after two tokens."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def astream_deltas(self, prompt: Any, params: SamplingParams) -> AsyncIterator[Any]:
        inner = self._llm.astream_deltas(prompt, params)
        if prompt != "FAIL":
            return inner
        return self._fail_after_two(inner)

    @staticmethod
    async def _fail_after_two(inner: Any) -> AsyncIterator[Any]:
        try:
            i = 0
            async for delta in inner:
                if i == 2:
                    raise RuntimeError("injected engine failure")
                i += 1
                yield delta
        finally:
            await inner.aclose()


def test_engine_exception_is_500_for_that_request_only(llm: LLM, expected: dict[str, str]) -> None:
    """In-process uvicorn around the real engine (the only way to make a healthy engine raise)."""
    import uvicorn

    from hybrid_engine.server import create_app

    port = _free_port()
    app = create_app(_FailingLLM(llm), served_model_name=MODEL, max_queue=4)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        while not srv.started:
            time.sleep(0.02)
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "FAIL", "max_tokens": 8},
                       timeout=60)
        assert r.status_code == 500 and "injected engine failure" in r.json()["error"]["message"]
        body = {"model": MODEL, "prompt": "FAIL", "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as resp:
            events = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and "injected engine failure" in json.loads(events[-2])["error"]["message"]
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4,
                                                         "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[PROMPTS[0]]
        assert blocks_settled(llm)
    finally:
        srv.should_exit = True
        thread.join(10)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed_stream(srv: Server, ids: list[int], max_tokens: int) -> tuple[float, list[float], str]:
    """Client-side TTFT and inter-chunk gaps of one streamed completion, and its text."""
    body = {"model": "llama-2-7b-shape", "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    stamps, texts = [], []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{srv.base}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
                texts.append(json.loads(line[6:])["choices"][0]["text"])
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - t0, gaps, "".join(texts)


@pytest.mark.gpu
@pytest.mark.timeout(540)
def test_server_on_gpu_latency_over_http(tmp_path: Path) -> None:
    """LLaMA-2-7B shape on the GPU behind HTTP: graphs captured, client-side TTFT / per-token over SSE, and the
    HTTP + SSE overhead (client TTFT minus the server's own TTFT histogram). Writes $OUT/server_gpu.json."""
    srv = Server(tmp_path, model="llama-2-7b-shape", max_model_len=1024, extra=("--capture", "idle"))
    try:
        srv.wait_ready(timeout_s=300)
        ids = list(range(100, 200))  # a 100-token prompt
        _timed_stream(srv, ids, 4)  # demand for the bucket; the capture worker fills idle windows
        deadline = time.time() + 120
        while httpx.get(f"{srv.base}/health").json()["capture"]["graphs_pending"] and time.time() < deadline:
            time.sleep(1)
        before = srv.metrics()
        runs = [_timed_stream(srv, ids, 32) for _ in range(30)]
        after = srv.metrics()
        health = httpx.get(f"{srv.base}/health").json()
        full = srv.client.completions.create(model="llama-2-7b-shape", prompt=ids, max_tokens=32, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text
    finally:
        srv.stop()
    ttft = [r[0] for r in runs]
    gaps = [g for r in runs for g in r[1]]
    key = "hybrid_engine_time_to_first_token_seconds"
    server_ttft = (after[key + "_sum"] - before[key + "_sum"]) / (after[key + "_count"] - before[key + "_count"])
    result = {"client_ttft_ms_p50": _percentile(ttft, 0.5) * 1e3, "client_ttft_ms_p99": _percentile(ttft, 0.99) * 1e3,
              "client_per_token_ms_p50": _percentile(gaps, 0.5) * 1e3,
              "client_per_token_ms_p99": _percentile(gaps, 0.99) * 1e3,
              "server_ttft_ms_mean": server_ttft * 1e3,
              "http_overhead_ms_mean": (sum(ttft) / len(ttft) - server_ttft) * 1e3, "health": health}
    print(json.dumps(result, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "server_gpu.json").write_text(json.dumps(result, indent=1))
    assert all(r[2] == full for r in runs), "streamed greedy text differs from the non-streamed one"
    assert health["capture"]["graphs_failed"] == 0 and health["capture"]["graphs_captured"] > 0
    assert result["http_overhead_ms_mean"] < 20
