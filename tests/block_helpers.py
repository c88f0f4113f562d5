"""KV-block accounting shared by the engine tests: after requests end, every block is free or cached."""
from __future__ import annotations


def blocks_settled(llm) -> bool:
    """No request holds a KV block (each is free, or cached for prefix reuse), nothing is in flight, and the
    allocator's bookkeeping is consistent (it raises if not)."""
    alloc = llm.scheduler.blocks.allocator
    alloc.check()
    s = llm.stats()
    return (s["kv_blocks_free"] + s["kv_blocks_cached"] == s["kv_blocks_total"] and not any(alloc.refs)
            and not s["request_in_flight"])


def metrics_blocks_settled(m: dict) -> bool:
    """`blocks_settled` from the server's /metrics gauges."""
    return m["hybrid_engine_kv_blocks_free"] + m["hybrid_engine_kv_blocks_cached"] == m["hybrid_engine_kv_blocks_total"]
