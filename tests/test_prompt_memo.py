"""PromptMemo (engine/prompt_memo.py): a conversation's next turn re-checks and re-hashes only its new tail, and
nothing a caller does to its own list can skip a check."""
import random

import pytest

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.engine.prompt_memo import PromptMemo

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _ids(seed: int, n: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(3, 200) for _ in range(n)]


def test_find_takes_the_longest_remembered_prefix_of_a_list():
    memo = PromptMemo(size=4, min_tokens=4)
    a, b = _ids(1, 10), _ids(2, 10)
    memo.remember(a, list(a), [11], ["e1"])
    memo.remember(a + b[:5], list(a + b[:5]), [22], ["e2"])
    memo.remember(b, list(b), [33], ["e3"])
    assert memo.find(a + b) == (a + b[:5], [22], ["e2"])
    assert memo.find(list(a)) == (a, [11], ["e1"])  # equal values, other list objects
    assert memo.find(tuple(a + b)) is None  # only lists are remembered and matched
    assert memo.find(a[:3]) is None  # shorter than min_tokens
    assert memo.find(_ids(3, 12)) is None
    assert memo.hits == 2


def test_a_callers_later_change_to_its_list_is_not_remembered():
    memo = PromptMemo(size=2, min_tokens=4)
    ids = _ids(4, 8)
    memo.remember(ids, list(ids), [], [])
    ids[2] = -5  # the caller edits its list in place after submitting it
    assert memo.find(ids + [1]) is None


def test_elements_that_do_not_compare_are_no_match():
    class Weird:
        def __eq__(self, other):
            raise TypeError("no")

    memo = PromptMemo(size=2, min_tokens=2)
    memo.remember([1, 2, 3], [1, 2, 3], [], [])
    assert memo.find([1, 2, Weird(), 4]) is None


@pytest.fixture(scope="module")
def llm():
    engine = LLM("tiny-llama", max_model_len=512, max_num_seqs=4)
    engine._memo = PromptMemo(min_tokens=16)  # short prompts keep the CPU test fast
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def plain():
    engine = LLM("tiny-llama", max_model_len=512, max_num_seqs=4, enable_prefix_caching=False)
    yield engine
    engine.close()


def test_a_conversation_hits_the_memo_and_keeps_its_tokens(llm, plain):
    history, hits = _ids(5, 40), llm._memo.hits
    for turn in range(4):
        want = plain.generate({"prompt_token_ids": list(history)}, GREEDY)[0].outputs[0].token_ids
        stream = llm.stream_deltas({"prompt_token_ids": history}, GREEDY)
        got = [t for d in stream for t in d.token_ids]
        assert got == want
        history = history + got + _ids(50 + turn, 9)
    assert llm._memo.hits - hits == 3
    # the seeded block hashes are the ones the block manager computes from the ids
    seq = llm.sequences([{"prompt_token_ids": history}], GREEDY)[0]
    blocks = llm.scheduler.blocks
    assert seq.block_hashes and seq.prompt_ids == history
    assert seq.block_hashes == blocks.hashes(history, [], len(seq.block_hashes))
    # and the claimed index entries are the ones a fresh lookup verifies, block for block
    assert seq.block_entries and len(seq.block_entries) <= len(seq.block_hashes)
    fresh: list = []
    blocks.cached_prefix(history, [], fresh)
    assert all(a is b for a, b in zip(seq.block_entries, fresh)) and len(fresh) >= len(seq.block_entries)


def test_the_new_tail_and_edited_history_are_still_checked(llm):
    vocab = llm.model.args.vocab_size
    history = _ids(6, 30)
    llm.generate({"prompt_token_ids": history}, GREEDY)
    with pytest.raises(ValueError, match=f"{vocab + 7}"):
        llm.generate({"prompt_token_ids": history + [5, vocab + 7]}, GREEDY)
    history[3] = vocab + 9  # edited in place, then re-sent with a tail
    with pytest.raises(ValueError, match=f"{vocab + 9}"):
        llm.generate({"prompt_token_ids": history + [5]}, GREEDY)
    history[3] = 2.5
    with pytest.raises(ValueError, match="must be ints"):
        llm.generate({"prompt_token_ids": history + [5]}, GREEDY)
    assert llm.generate({"prompt_token_ids": _ids(7, 20)}, GREEDY)[0].outputs[0].token_ids  # still serving
