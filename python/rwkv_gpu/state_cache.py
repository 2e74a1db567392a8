"""StateCache: remembers the state after a prompt prefix (a system prompt, a long
document, a conversation so far) so that a later prompt starting with it feeds only the
rest."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import errors
from ._values import int_values

if TYPE_CHECKING:
    from .model import Model, State


class StateCache:
    """Least-recently-used cache of states keyed by the tokens that produced them.

        cache = rwkv_gpu.StateCache(max_entries=8)
        model.complete(system + question1, cache=cache)   # feeds everything
        model.complete(system + question2, cache=cache)   # feeds only question2

    Each entry holds one state on the device (`model.memory()["states"]` grows by one
    slot per entry). `max_bytes` bounds the entries' device memory as well (the Engine's
    prefix cache). Entries are only used for generations that start from the model's
    initial state (`state=None`), and a cache may serve several models.
    """

    def __init__(self, max_entries: int = 8, max_bytes: int | None = None) -> None:
        if max_entries < 1:
            raise errors.InvalidOptionError(f"max_entries must be at least 1, got {max_entries}")
        if max_bytes is not None and max_bytes < 0:
            raise errors.InvalidOptionError(f"max_bytes must not be negative, got {max_bytes}")
        self.max_entries = int(max_entries)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._entries: OrderedDict[tuple, State] = OrderedDict()
        self._bytes = 0  # kept as entries come and go: `bytes` is read from other threads
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0

    @property
    def bytes(self) -> int:
        """Device bytes held by the entries."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    @staticmethod
    def _key(model: Model, tokens: Sequence[int]) -> tuple:
        # The initial state's version: states built on another start are not reused.
        return (id(model), model._initial_version, tuple(tokens))

    def find(self, model: Model, tokens: Sequence[int]) -> tuple[State | None, int]:
        """(the cached state after the longest cached prefix of `tokens`, its length), the
        entry itself (copy it, do not advance it); (None, 0) when nothing matches. Counts
        a hit or a miss."""
        tokens = tuple(tokens)
        me = self._key(model, ())[:2]
        best: tuple | None = None
        for key in self._entries:
            n = len(key[2])
            if key[:2] == me and n <= len(tokens) and (best is None or n > len(best[2])) and key[2] == tokens[:n]:
                best = key
        if best is None:
            self.misses += 1
            return None, 0
        self._entries.move_to_end(best)
        self.hits += 1
        self.tokens_saved += len(best[2])
        return self._entries[best], len(best[2])

    def lookup(self, model: Model, tokens: Sequence[int]) -> tuple[State, int]:
        """(a copy of the state after the longest cached prefix of `tokens`, its length);
        a fresh start state and 0 when nothing matches."""
        state, n = self.find(model, tokens)
        return (model.new_state() if state is None else state.clone()), n

    def store(self, model: Model, tokens: Sequence[int], state: State) -> None:
        """Remembers a copy of `state`, which must be the state after `tokens`; the least
        recently used entries go while the cache is over its bounds."""
        model._check_state(state)  # a state of another model would be found under this one's key
        tokens = int_values(tokens, "tokens")
        if self.max_bytes is not None and model.state_bytes > self.max_bytes:
            return
        key = self._key(model, tokens)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old._model.state_bytes
        self._entries[key] = state.clone()
        self._bytes += model.state_bytes
        while len(self._entries) > self.max_entries or (self.max_bytes is not None and self._bytes > self.max_bytes):
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted._model.state_bytes

    def prefill(self, model: Model, tokens: Sequence[int]) -> None:
        """Feeds `tokens` (from the longest cached prefix on) and remembers the result."""
        tokens = model._prompt_ids(tokens)
        state, n = self.lookup(model, tokens)
        if n < len(tokens):
            model.prefill(tokens[n:], state)
            self.store(model, tokens, state)

    def resume(self, model: Model, tokens: list[int]) -> tuple[State, list[int]]:
        """For a generation: the state after all of `tokens` but the last, fed from the
        longest cached prefix and remembered, and what is left to feed (the last token,
        whose logits the first draw needs)."""
        head = tokens[:-1]
        state, n = self.lookup(model, head)
        if n < len(head):
            model.prefill(head[n:], state)
            self.store(model, head, state)
        return state, tokens[-1:]
