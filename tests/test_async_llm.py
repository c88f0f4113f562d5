"""The asyncio front end: concurrent requests batched over one driver thread, the same tokens as run alone,
cancellation (aclose, a cancelled task, a dropped stream) frees blocks, step failures reach the awaiting caller, and
sync callers share the core with it."""
import asyncio
import threading
import time

import pytest
from block_helpers import blocks_settled

from hybrid_engine import AsyncLLM, LLM, SamplingParams
from hybrid_engine.engine import EngineClosed

PROMPTS = [[1, 5, 9], [1, 77, 3, 200, 41, 8, 15], [1, 300], [1, 42] * 9, [1, 499, 498, 497]]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-llama", max_model_len=128, max_num_seqs=4)


def _greedy(n=20):
    return [SamplingParams(max_tokens=n + 3 * i, temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]


def _alone(llm, params):
    return [llm.generate({"prompt_token_ids": p}, sp)[0].outputs[0].token_ids for p, sp in zip(PROMPTS, params)]


def _batched_rows(llm):
    return sum(k * v for k, v in llm.stats()["decode_batch_sizes"].items() if k > 1)


def _wait_all_free(llm, timeout_s=10.0):
    deadline = time.time() + timeout_s
    while True:
        s = llm.stats()
        if blocks_settled(llm):
            return
        assert time.time() < deadline, f"blocks not freed: {s}"
        time.sleep(0.01)


def test_agenerate_batches_and_equals_alone(llm):
    want = _alone(llm, _greedy())
    before = _batched_rows(llm)
    outs = asyncio.run(llm.agenerate([{"prompt_token_ids": p} for p in PROMPTS], _greedy()))
    assert [o.outputs[0].token_ids for o in outs] == want
    assert _batched_rows(llm) > before
    assert outs[0].metrics.generated_tokens == 20 and outs[0].outputs[0].finish_reason == "length"
    _wait_all_free(llm)


def test_concurrent_astreams_equal_sync_streams(llm):
    want_text = ["".join(llm.stream({"prompt_token_ids": p}, sp)) for p, sp in zip(PROMPTS, _greedy())]

    async def one(p, sp):
        return "".join([t async for t in llm.astream({"prompt_token_ids": p}, sp)])

    async def run():
        return await asyncio.gather(*(one(p, sp) for p, sp in zip(PROMPTS, _greedy())))

    before = _batched_rows(llm)
    assert asyncio.run(run()) == want_text
    assert _batched_rows(llm) > before


def test_aclose_cancels_one_request_and_the_others_go_on(llm):
    params = _greedy()
    params[1] = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    want = _alone(llm, params)
    cancelled = llm.stats()["requests_cancelled"]
    first, rest = asyncio.run(_three_of_one_then_the_rest(llm, params))
    assert first == want[1][:3]
    assert rest == [w for i, w in enumerate(want) if i != 1]
    _wait_all_free(llm)
    assert llm.stats()["requests_cancelled"] == cancelled + 1


async def _three_of_one_then_the_rest(llm, params):
    streams = [llm.astream_deltas({"prompt_token_ids": p}, sp) for p, sp in zip(PROMPTS, params)]
    first = []
    async for d in streams[1]:
        first.extend(d.token_ids)
        if len(first) == 3:
            break
    await streams[1].aclose()
    rest = []
    for s in streams:
        if s is not streams[1]:
            rest.append([t async for d in s for t in d.token_ids])
    return first, rest


def test_cancelled_task_cancels_its_request(llm):
    long = SamplingParams(max_tokens=110, temperature=0, ignore_eos=True)

    async def consume(got):
        async for d in llm.astream_deltas({"prompt_token_ids": PROMPTS[0]}, long):
            got.extend(d.token_ids)

    async def run():
        got = []
        task = asyncio.create_task(consume(got))
        while len(got) < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    cancelled = llm.stats()["requests_cancelled"]
    got = asyncio.run(run())
    _wait_all_free(llm)
    assert 2 <= len(got) < 110 and llm.stats()["requests_cancelled"] == cancelled + 1


def test_a_failed_step_reaches_the_awaiting_caller(llm, monkeypatch, fail_decode_step):
    fail_decode_step(llm, 3)
    with pytest.raises(RuntimeError, match="injected"):
        asyncio.run(llm.agenerate([{"prompt_token_ids": p} for p in PROMPTS[:3]], _greedy()[:3]))
    _wait_all_free(llm)
    monkeypatch.undo()
    outs = asyncio.run(llm.agenerate([{"prompt_token_ids": p} for p in PROMPTS], _greedy()))
    assert [o.outputs[0].token_ids for o in outs] == _alone(llm, _greedy())


def test_bad_request_raises_at_once_and_names_the_value(llm):
    async def run():
        with pytest.raises(ValueError, match="max_model_len=128"):
            llm.astream_deltas({"prompt_token_ids": [1] * 100}, SamplingParams(max_tokens=64))
        with pytest.raises(ValueError, match="prompt must be str or dict, got int"):
            await llm.agenerate([5])

    asyncio.run(run())
    with pytest.raises(RuntimeError, match="running event loop"):
        llm.astream_deltas({"prompt_token_ids": PROMPTS[0]})
    _wait_all_free(llm)


def test_sync_and_async_callers_share_the_core(llm):
    params = _greedy(30)
    want = _alone(llm, params)
    got = [None] * len(PROMPTS)

    def sync_caller(i):
        got[i] = [t for d in llm.stream_deltas({"prompt_token_ids": PROMPTS[i]}, params[i]) for t in d.token_ids]

    async def async_callers():
        outs = await llm.agenerate([{"prompt_token_ids": PROMPTS[i]} for i in (1, 3)], [params[1], params[3]])
        got[1], got[3] = (o.outputs[0].token_ids for o in outs)

    threads = [threading.Thread(target=sync_caller, args=(i,)) for i in (0, 2, 4)]
    for t in threads:
        t.start()
    asyncio.run(async_callers())
    for t in threads:
        t.join(60)
    assert got == want
    _wait_all_free(llm)


def test_the_driver_sleeps_when_idle(llm, monkeypatch):
    asyncio.run(llm.agenerate({"prompt_token_ids": PROMPTS[0]}, _greedy()[0]))  # the driver thread is up
    steps = {"n": 0}
    real = llm.core.step

    def counted():
        steps["n"] += 1
        real()

    monkeypatch.setattr(llm.core, "step", counted)
    time.sleep(0.3)
    assert steps["n"] == 0
    asyncio.run(llm.agenerate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=5, temperature=0)))
    assert 4 <= steps["n"] <= 6  # the request's steps (the first prefills and decodes), and no idle ones


def test_close_fails_running_requests_and_a_later_request_restarts_the_driver(llm):
    engine = AsyncLLM(llm)
    assert engine.driver is llm.driver  # one driver thread per engine

    async def run():
        stream = engine.stream_deltas({"prompt_token_ids": PROMPTS[0]},
                                      SamplingParams(max_tokens=110, temperature=0, ignore_eos=True))
        await stream.__anext__()
        await asyncio.to_thread(engine.close)
        with pytest.raises(EngineClosed):
            async for _ in stream:
                pass
        return await engine.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, temperature=0))

    out = asyncio.run(run())
    assert out.outputs[0].token_ids == llm.chat([{"role": "user", "content": "hi"}],
                                                SamplingParams(max_tokens=4, temperature=0)).outputs[0].token_ids
    _wait_all_free(llm)


def test_mailbox_delivers_every_item_in_order_with_fewer_wakeups(monkeypatch):
    """Items posted from another thread reach their queues in order; items posted before the loop drains share one
    wake-up (call_soon_threadsafe); a closed loop is an error for the poster."""
    from hybrid_engine.engine.async_stream import _LoopMailbox

    async def scenario():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe
        monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a: (wakeups.append(1), real(*a))[1])
        box = _LoopMailbox.of(loop)
        assert _LoopMailbox.of(loop) is box
        queues = [asyncio.Queue() for _ in range(4)]

        def produce():
            for step in range(50):
                for q in queues:
                    box.post(q, step)

        t = threading.Thread(target=produce)
        t.start()
        t.join()  # the loop is blocked meanwhile (as while it serves other callbacks): every post shares a wake-up
        first = len(wakeups)
        got = [[await q.get() for _ in range(50)] for q in queues]
        return got, first

    got, wakeups = asyncio.run(scenario())
    assert got == [list(range(50))] * 4
    assert wakeups == 1
    loop = asyncio.new_event_loop()
    box = _LoopMailbox.of(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        box.post(asyncio.Queue(), 1)
