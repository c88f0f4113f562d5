"""The interactive chat loop behind `hybrid-engine chat`: one line in, the assistant's reply streamed out.

The conversation is kept as chat messages and rendered with the tokenizer's chat template on every turn; when it
no longer fits in max_model_len, the oldest exchanges are dropped. `/reset` starts over, `/exit` (or end of
input) quits. The loop reads and writes the streams it is given, so tests drive it with `io.StringIO`.
"""
from __future__ import annotations

from typing import Any, TextIO

COMMANDS = ("/reset", "/exit", "/quit")


class ChatHistory:
    """Messages of one conversation, trimmed from the oldest exchange to fit a token budget."""

    def __init__(self, system: str | None = None) -> None:
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []

    def reset(self) -> None:
        self.turns.clear()

    def messages(self, user: str) -> list[dict[str, str]]:
        return [*self.system, *self.turns, {"role": "user", "content": user}]

    def add(self, user: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def prompt_ids(self, llm: Any, user: str, max_tokens: int) -> list[int]:
        """Token ids of the conversation plus `user`, dropping the oldest exchanges until max_tokens fit."""
        ids = llm.encode_chat(self.messages(user))
        while len(ids) + max_tokens > llm.max_model_len and self.turns:
            del self.turns[:2]
            ids = llm.encode_chat(self.messages(user))
        if len(ids) + max_tokens > llm.max_model_len:
            raise ValueError(f"the message ({len(ids)} tokens with the template) + max_tokens ({max_tokens}) does "
                             f"not fit in max_model_len={llm.max_model_len}")
        return ids


def run_chat(llm: Any, params: Any, stdin: TextIO, stdout: TextIO, stderr: TextIO, system: str | None = None,
             show_prompt: bool = False) -> int:
    """Read user lines from `stdin` until `/exit` or end of input; stream each reply to `stdout`."""
    history = ChatHistory(system)
    while True:
        if show_prompt:
            stderr.write("> ")
            stderr.flush()
        line = stdin.readline()
        if not line:
            return 0
        user = line.strip()
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            history.reset()
            stderr.write("[history cleared]\n")
        elif user.startswith("/"):
            stderr.write(f"unknown command {user!r}; commands: {list(COMMANDS)}\n")
        elif user:
            _turn(llm, params, history, user, stdout, stderr)


def _turn(llm: Any, params: Any, history: ChatHistory, user: str, stdout: TextIO, stderr: TextIO) -> None:
    try:
        ids = history.prompt_ids(llm, user, params.max_tokens)
    except ValueError as exc:
        stderr.write(f"error: {exc}\n")
        return
    pieces, delta = [], None
    deltas = llm.stream_deltas({"prompt_token_ids": ids}, params)
    try:
        for delta in deltas:
            pieces.append(delta.text)
            stdout.write(delta.text)
            stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C stops this reply (the request is cancelled), not the session
        deltas.close()
        stderr.write("\n[interrupted]")
    stdout.write("\n")
    history.add(user, "".join(pieces))
    if delta is not None and delta.metrics is not None:
        m = delta.metrics
        stderr.write(f"[{m.prompt_tokens} prompt + {m.generated_tokens} generated tokens; TTFT "
                     f"{m.ttft_s * 1e3:.1f} ms, per token {m.tpot_s * 1e3:.1f} ms]\n")
