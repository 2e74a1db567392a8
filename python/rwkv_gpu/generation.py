"""The generation loop behind `Model.generate` and `Model.complete`.

Each step is one call into Rust (`_core.Generation.step`): feed the pending tokens, read
the last logits, penalise and draw, with the GIL released. Python decodes the token,
looks for stop strings and yields text. The loop can be left at any point (Ctrl-C, a
`break`): `finish` then feeds the one drawn token still pending, so the state always
holds exactly the prompt and the tokens drawn (stop tokens excepted).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from . import errors
from .sampling import Sampler, Sampling

if TYPE_CHECKING:
    from .model import Model, State
    from .state_cache import StateCache


@dataclass
class Completion:
    """What `Model.complete` returns."""

    text: str
    finish_reason: str  # "stop" (a stop string or stop token) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    tokens: list[int] = field(default_factory=list)  # the tokens drawn (a stop token excluded)


class StopMatcher:
    """Holds back text that could be the start of a stop string, so that a stop string
    is found even when it spans several tokens and never reaches the caller."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text that is safe to emit, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            # The longest tail of pending that is a proper prefix of this stop string.
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Run:
    """One generation; iterate it for text pieces. Afterwards `finish_reason`,
    `tokens` (drawn) and `prompt_tokens` describe what happened."""

    def __init__(
        self,
        model: Model,
        prompt: str | Sequence[int],
        state: State | None,
        max_tokens: int,
        sampling: Sampling,
        stop: Sequence[str],
        stop_tokens: Sequence[int],
        cache: StateCache | None,
    ) -> None:
        if max_tokens < 1:
            raise errors.InvalidOptionError(f"max_tokens must be at least 1, got {max_tokens}")
        if isinstance(stop, str):
            stop = [stop]
        self.model = model
        self.tokenizer = model.tokenizer
        ids = model._prompt_ids(prompt)
        vocab = model.config["vocab_size"]
        # Ids past the tokenizer's vocabulary (World: 65530..65535) have no text.
        sampling = sampling.with_bans(range(self.tokenizer.vocab_size, vocab))
        self.sampler = Sampler(vocab, sampling)
        self.prompt_tokens = len(ids)
        self.max_tokens = max_tokens
        self.stop = StopMatcher(stop)
        self.stop_tokens = {int(t) for t in stop_tokens}
        self.finish_reason: str | None = None
        self._given_at_close: list[int] = []
        if cache is not None and state is None:
            self.state, ids = cache.resume(model, ids)
        else:
            self.state = model._start_state(state)
        self._core = model._m.generation(ids, self.state._core, self.sampler._core)
        model._live_runs.add(self)

    @property
    def tokens(self) -> list[int]:
        """The tokens drawn and handed out so far, in order: exactly those fed into the
        state after the prompt once the run ends, however it ends (Ctrl-C included)."""
        return self._given_at_close if self._core is None else list(self._core.given())

    def _close(self) -> None:
        """The model is closing: drop the native generation (and its hold on the model's
        memory); iteration ends with finish_reason "closed"."""
        if self._core is not None:
            self._given_at_close = list(self._core.given())
        self._core = None

    def __iter__(self) -> Iterator[str]:
        decoder = self.tokenizer.stream_decoder()
        try:
            for _ in range(self.max_tokens):
                if self._core is None:
                    self.finish_reason = "closed"
                    return
                token = self._core.step()
                if token in self.stop_tokens:
                    self._core.discard_pending()
                    self.finish_reason = "stop"
                    break
                # Taken: listed in `tokens` and, once the run ends, fed (one native call,
                # so Ctrl-C cannot fall between the two).
                self._core.record(token, self.tokenizer.token_bytes(token) or b"")
                text, stopped = self.stop.push(decoder.push(token))
                if text:
                    yield text
                if stopped:
                    self.finish_reason = "stop"
                    break
            else:
                self.finish_reason = "length"
                tail, stopped = self.stop.push(decoder.finish())
                if stopped:
                    self.finish_reason = "stop"
                tail += self.stop.flush()
                if tail:
                    yield tail
        finally:
            if self._core is not None:
                self._core.finish()

    def fed_tokens(self) -> list[int]:
        """The tokens fed into the state by this run (after the prompt part a StateCache
        supplied), in order."""
        return list(self._core.fed())


class BatchRun:
    """Several generations stepped together (`Model.complete_batch`): each step feeds
    every live sequence in one forward call, then each draws with its own sampler.
    Sequence i samples with seed + i when a seed is given, so that copies of one prompt
    draw differently yet reproducibly."""

    def __init__(
        self,
        model: Model,
        prompts: Sequence[str | Sequence[int]],
        states: Sequence[State] | None,
        max_tokens: int,
        sampling: Sampling,
        stop: Sequence[str] | str,
        stop_tokens: Sequence[int],
    ) -> None:
        if max_tokens < 1:
            raise errors.InvalidOptionError(f"max_tokens must be at least 1, got {max_tokens}")
        if isinstance(prompts, str):
            raise errors.ShapeError("prompts must be a list of prompts (texts or token lists)")
        self.tokenizer = model.tokenizer
        self.ids = [model._prompt_ids(p) for p in prompts]
        if not self.ids:
            raise errors.ShapeError("prompts is empty: give at least one prompt")
        if states is None:
            self.states = model.new_states(len(self.ids))
        else:
            self.states = list(states)
            if len(self.states) != len(self.ids):
                raise errors.ShapeError(f"{len(self.ids)} prompts but {len(self.states)} states: give one state per prompt")
            for state in self.states:
                model._check_state(state)
        vocab = model.config["vocab_size"]
        sampling = sampling.with_bans(range(self.tokenizer.vocab_size, vocab))
        seeds = [None if sampling.seed is None else (int(sampling.seed) + i) % 2**64 for i in range(len(self.ids))]
        samplers = [Sampler(vocab, replace(sampling, seed=seed)) for seed in seeds]
        self.max_tokens = max_tokens
        self.stops = [stop] if isinstance(stop, str) else list(stop)
        self.stop_tokens = {int(t) for t in stop_tokens}
        self._given_at_close: list[list[int]] = [[] for _ in self.ids]
        self.finish_reasons: list[str | None] = [None] * len(self.ids)
        self._core = model._m.batch_generation(self.ids, [s._core for s in self.states], [s._core for s in samplers])
        model._live_runs.add(self)

    @property
    def tokens(self) -> list[list[int]]:
        """Each sequence's tokens drawn and handed out so far (as `Run.tokens`)."""
        if self._core is None:
            return self._given_at_close
        return [list(self._core.given(i)) for i in range(len(self.ids))]

    def _close(self) -> None:
        """As `Run._close`: every sequence still going ends with "closed"."""
        if self._core is not None:
            self._given_at_close = self.tokens
        self._core = None

    def __iter__(self) -> Iterator[tuple[int, str]]:
        """(sequence index, text piece) as each sequence produces text; afterwards
        `tokens[i]` and `finish_reasons[i]` describe each sequence. Leaving the loop early
        is clean: every state then holds its prompt and the tokens drawn so far."""
        n = len(self.ids)
        decoders = [self.tokenizer.stream_decoder() for _ in range(n)]
        matchers = [StopMatcher(self.stops) for _ in range(n)]
        try:
            for _ in range(self.max_tokens):
                if self._core is None:
                    self.finish_reasons = [r or "closed" for r in self.finish_reasons]
                    return
                drawn = self._core.step()
                if all(t is None for t in drawn):
                    break
                for i, token in enumerate(drawn):
                    if self._core is None:  # closed while a piece was out
                        break
                    if token is None:
                        continue
                    if token in self.stop_tokens:
                        self._core.stop(i, False)
                        self.finish_reasons[i] = "stop"
                        continue
                    self._core.record(i, token, self.tokenizer.token_bytes(token) or b"")
                    text, stopped = matchers[i].push(decoders[i].push(token))
                    if text:
                        yield i, text
                    if stopped:
                        self._core.stop(i, True)
                        self.finish_reasons[i] = "stop"
            for i in range(n):
                if self.finish_reasons[i] is None:
                    self.finish_reasons[i] = "length"
                    tail, stopped = matchers[i].push(decoders[i].finish())
                    if stopped:
                        self.finish_reasons[i] = "stop"
                    tail += matchers[i].flush()
                    if tail:
                        yield i, tail
        finally:
            if self._core is not None:
                self._core.finish()

    def run(self) -> list[Completion]:
        """Runs to the end and collects each sequence's Completion, in order."""
        texts: list[list[str]] = [[] for _ in self.ids]
        for i, piece in self:
            texts[i].append(piece)
        tokens = self.tokens
        return [Completion("".join(texts[i]), self.finish_reasons[i] or "length", len(self.ids[i]), len(tokens[i]),
                           tokens[i]) for i in range(len(self.ids))]

    def fed_tokens(self, i: int) -> list[int]:
        """The tokens fed into sequence i's state by this run, in order."""
        return list(self._core.fed(i))
