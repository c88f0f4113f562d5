"""The engine freezes what is alive after loading out of Python's cyclic GC (hybrid_engine/runtime/_gc.py) and unfreezes on
close(), so a closed engine's reference cycles are collectable again."""
import gc
import weakref

from hybrid_engine import LLM


def test_load_freezes_and_close_unfreezes():
    gc.unfreeze()
    llm = LLM("tiny-llama")
    assert gc.get_freeze_count() > 0
    probe = weakref.ref(llm.runner)
    llm.close()
    assert gc.get_freeze_count() == 0
    del llm
    gc.collect()
    assert probe() is None  # nothing of the closed engine stays pinned
