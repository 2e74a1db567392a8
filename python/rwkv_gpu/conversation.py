"""Chat: a conversation in the RWKV-7 chat format, with its state kept across turns."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._values import int_value
from .generation import STOP_TOKENS
from .sampling import Sampling, sampling_options

if TYPE_CHECKING:
    from .model import Model, State

# Turns end with a blank line, so a message must not contain one (the official chat demo
# collapses runs of newlines in what the user types, for the same reason).
_BLANK_LINES = re.compile(r"\n\s*\n")


def clean_message(text: str) -> str:
    return _BLANK_LINES.sub("\n", text.strip().replace("\r\n", "\n"))


# The RWKV-7 chat format: one "Role: text" turn per message, each ending with a blank
# line; a reply is asked for with "Assistant:" and ends at the next blank line (which
# the state keeps, as the official chat demo does).
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
REPLY_PROMPT = "Assistant:"
REPLY_STOP = "\n\n"


def turn(role: str, text: str) -> str:
    """One message as the model reads it, e.g. turn("user", "Hi") == "User: Hi\n\n"."""
    return f"{ROLES[role]}: {clean_message(text)}\n\n"


class ReplyStart:
    """Drops the space that follows "Assistant:" from a reply's first pieces."""

    def __init__(self) -> None:
        self.started = False

    def push(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip(" ")
            self.started = bool(piece)
        return piece


def reply_text(pieces: Iterator[str]) -> Iterator[str]:
    """A reply's pieces without the space that follows "Assistant:"."""
    start = ReplyStart()
    for piece in pieces:
        piece = start.push(piece)
        if piece:
            yield piece


class Chat:
    """A conversation:

        chat = rwkv_gpu.Chat(model, system="You are a helpful assistant.")
        for piece in chat.send("Hello!"):
            print(piece, end="", flush=True)

    Each turn feeds `User: {message}\\n\\nAssistant:` and streams the reply until a blank
    line, which (with the whole reply) stays in the state, so the next turn feeds only
    its own message. `system` is fed once as `System: {system}\\n\\n`. `state` (default:
    the model's initial state) is where the conversation starts; `chat.state` is where it
    is. Sampling keywords (temperature, top_p, ..., seed) apply to every reply.
    """

    def __init__(self, model: Model, system: str | None = None, state: State | None = None,
                 max_tokens: int = 1024, **sampling: Any) -> None:
        self.model = model
        self.state = model.new_state() if state is None else state.clone()
        self.max_tokens = int_value(max_tokens, "max_tokens")
        self.sampling = sampling  # checked at each turn, before anything is fed
        self.history: list[tuple[str, str]] = []  # (user message, reply) per finished turn
        self.tokens: list[int] = []  # every token fed into `state` by this chat, in order
        self._pending = turn("system", system) if system else ""

    def send(self, message: str) -> Iterator[str]:
        """Streams the reply to `message` (leading and trailing whitespace removed)."""
        if not isinstance(message, str):
            raise TypeError(f"message must be a string, got {type(message).__name__}")
        before = self._pending
        text = before + turn("user", message) + REPLY_PROMPT
        prompt = self.model.tokenizer.encode(text)
        # A reply ends at the next turn: stop strings and tokens are the chat's own.
        sampling = Sampling(**sampling_options(dict(self.sampling), takes=()))
        run = self.model._run(prompt, self.state, self.max_tokens, sampling, [REPLY_STOP], STOP_TOKENS, None)
        self._pending = ""  # only now: a bad option or tokenizer above leaves the turn unsent
        pieces: list[str] = []
        stream = iter(run)
        try:
            for piece in reply_text(stream):
                pieces.append(piece)
                yield piece
        finally:
            # Feeds the drawn token still pending if it was handed out (after a break or
            # Ctrl-C too), so the state holds exactly the reply given.
            stream.close()
            fed = run.fed_tokens()
            self.tokens += fed
            if fed:
                self.history.append((message, "".join(pieces)))
            else:  # interrupted before the prompt went in: the turn never happened
                self._pending = before

    def ask(self, message: str) -> str:
        """The whole reply to `message`."""
        return "".join(self.send(message))

