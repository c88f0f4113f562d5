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


def test_what_the_transformers_thread_made_is_frozen_too(tmp_path, monkeypatch):
    """The overlapped load (models/loader.load_overlapped) makes transformers' config on a thread, here after the
    load's first freeze; the load freezes again once it has taken it, so serving's collections do not scan it."""
    import time

    from hybrid_engine.models import loader
    from hybrid_engine.models.presets import build_hf_model

    model, tokenizer = build_hf_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    read_config = loader._read_config
    monkeypatch.setattr(loader, "_read_config", lambda path: (time.sleep(1.0), read_config(path))[1])  # made late
    gc.unfreeze()
    llm = LLM(str(tmp_path))
    try:
        assert "transformers_wait" in llm.load_phases_s
        config = llm.model_config
        assert gc.is_tracked(config) and not any(o is config for o in gc.get_objects())  # in the frozen generation
    finally:
        llm.close()
