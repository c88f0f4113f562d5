"""Incremental Hermes tool-call parsing for streamed replies, in the shape OpenAI streams them.

Fed text deltas, `HermesToolStreamParser.feed` returns the content to show now and the tool-call deltas to send:
a call's first delta carries `index`, `id`, `type` and `function.name` (arguments ""), the next ones carry
argument text fragments; the fragments of a call concatenate to its arguments JSON. Text that may be the start of
`<tool_call>` is held back until it is known not to be.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from .parsers import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, _decode_call, new_call_id

logger = logging.getLogger(__name__)

# '{"name": "<name>", "arguments": ' at the start of a block: once it is read, the name can be sent
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


@dataclass(slots=True)
class StreamDelta:
    """What one `feed` produced: content text ("" if none) and OpenAI `delta.tool_calls` entries."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class _JsonObjectScanner:
    """Tracks where a JSON object ends, one character at a time (strings and escapes respected)."""

    __slots__ = ("depth", "in_string", "escaped")

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped = 0, False, False

    def step(self, ch: str) -> bool:
        """Consume one character; True when it closed the outermost object."""
        if self.in_string:
            self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            return False
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class HermesToolStreamParser:
    """Stream parser for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` output.

    `feed(delta)` for each text delta, `finish()` at the end; `tool_calls` holds the complete calls so far. A block
    whose head is not `{"name": ..., "arguments": ...` is sent as one delta when it closes, or as content if it
    is not a call at all."""

    def __init__(self) -> None:
        self.tool_calls: list[dict[str, Any]] = []
        self._buf = ""            # text not yet handled (outside a block) or the current block's body
        self._in_call = False
        self._head_sent = False
        self._scanner = _JsonObjectScanner()
        self._scanned = 0         # how much of the block's arguments has been scanned and sent
        self._args_start = 0
        self._args_done = False
        self._content_started = False

    def feed(self, text: str) -> StreamDelta:
        """Handle the next text delta."""
        self._buf += text
        out = StreamDelta()
        while self._step(out):
            pass
        return out

    def finish(self) -> StreamDelta:
        """End of the reply: held-back text is content; an unclosed block is content unless its call was begun."""
        out = StreamDelta()
        if self._in_call and not self._head_sent:
            self._emit_content(out, TOOL_CALL_OPEN + self._buf)
        elif self._in_call:
            logger.warning("stream ended inside a <tool_call> block; its arguments may be incomplete")
        else:
            self._emit_content(out, self._buf)
        self._buf = ""
        return out

    def _step(self, out: StreamDelta) -> bool:
        return self._step_call(out) if self._in_call else self._step_text(out)

    def _step_text(self, out: StreamDelta) -> bool:
        start = self._buf.find(TOOL_CALL_OPEN)
        if start < 0:
            keep = _partial_suffix(self._buf, TOOL_CALL_OPEN)
            self._emit_content(out, self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._emit_content(out, self._buf[:start])
        self._buf = self._buf[start + len(TOOL_CALL_OPEN):]
        self._open_call()
        return True

    def _open_call(self) -> None:
        self._in_call, self._head_sent, self._args_done = True, False, False
        self._scanner, self._scanned, self._args_start = _JsonObjectScanner(), 0, 0

    def _step_call(self, out: StreamDelta) -> bool:
        if not self._head_sent:
            self._try_head(out)
        if self._head_sent and not self._args_done:
            self._stream_arguments(out)
        end = self._buf.find(TOOL_CALL_CLOSE, self._args_start + self._scanned if self._head_sent else 0)
        if end < 0 or (self._head_sent and not self._args_done and self._scanner.in_string):
            return False
        self._close_call(out, self._buf[:end])
        self._buf = self._buf[end + len(TOOL_CALL_CLOSE):]
        self._in_call = False
        return True

    def _try_head(self, out: StreamDelta) -> None:
        head = _CALL_HEAD.match(self._buf)
        if head is None:
            return
        name = json.loads(f'"{head.group(1)}"')
        call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.tool_calls.append(call)
        out.tool_calls.append({"index": len(self.tool_calls) - 1, **json.loads(json.dumps(call))})
        self._head_sent, self._args_start = True, head.end()

    def _stream_arguments(self, out: StreamDelta) -> None:
        begin = self._args_start + self._scanned
        pos = begin
        while pos < len(self._buf) and not self._args_done:
            self._args_done = self._scanner.step(self._buf[pos])
            pos += 1
        if pos > begin:
            fragment = self._buf[begin:pos]
            self._scanned += len(fragment)
            self.tool_calls[-1]["function"]["arguments"] += fragment
            out.tool_calls.append({"index": len(self.tool_calls) - 1, "function": {"arguments": fragment}})

    def _close_call(self, out: StreamDelta, body: str) -> None:
        if self._head_sent:
            if not self._args_done:
                logger.warning("<tool_call> block closed before its arguments did: %r", body[:200])
            return
        call = _decode_call(body)
        if call is None:
            self._emit_content(out, TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
            return
        self.tool_calls.append(call)
        out.tool_calls.append({"index": len(self.tool_calls) - 1, **json.loads(json.dumps(call))})

    def _emit_content(self, out: StreamDelta, text: str) -> None:
        if not self._content_started:
            text = text.lstrip()
            self._content_started = bool(text)
        out.content += text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
