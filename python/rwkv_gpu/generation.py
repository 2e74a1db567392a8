"""The generation loop behind `Model.generate`, `complete`, `*_batch` and the Engine.

The stepping is Rust's (`_core.Batch`: feed what is pending, then penalise and draw,
on the device or from the logits on the host, for every sequence at once, GIL released). Python turns each drawn
token into text (`TextStream`: decoding, stop tokens, stop strings, max_tokens). A run
can be left at any point (Ctrl-C, a `break`, a cancelled request): the core's `finish`
then feeds only the drawn tokens handed out, so a state always holds exactly the prompt
and the tokens given (stop tokens excepted).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import errors
from ._values import int_value, int_values
from .sampling import Sampler, Sampling, item_seed

if TYPE_CHECKING:
    from .model import Model, State, Tokens
    from .state_cache import StateCache
    from .tokenizer import Tokenizer


# The defaults of every generation call (Model.generate, complete, the *_batch calls,
# Engine.submit, `python -m rwkv_gpu.generate`): at most this many tokens, and the ids
# that end a run (0 is end of text). The server and Chat keep their own, per their APIs.
MAX_TOKENS = 256
STOP_TOKENS: tuple[int, ...] = (0,)


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


def _stop_strings(stop: Any) -> list[str]:
    """`stop` as a list: one string, or an iterable of strings (not bytes, not numbers)."""
    if isinstance(stop, str):
        return [stop]
    try:
        stops = None if isinstance(stop, (bytes, bytearray)) else list(stop)
    except TypeError:
        stops = None
    if stops is None or not all(isinstance(s, str) for s in stops):
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    return stops


class TextStream:
    """One sequence's text: decodes its drawn tokens into complete UTF-8 pieces and
    decides when it ends (a stop token, a stop string, max_tokens). The same for a
    single generation, a batch and the Engine's requests. Without a tokenizer (a model
    whose vocabulary has none, e.g. a random one) it gives tokens only, no text."""

    def __init__(self, tokenizer: Tokenizer | None, max_tokens: int, stop: Sequence[str] | str, stop_tokens: Sequence[int]) -> None:
        if int_value(max_tokens, "max_tokens") < 1:
            raise errors.InvalidOptionError(f"max_tokens must be at least 1, got {max_tokens}")
        stops = _stop_strings(stop)
        if tokenizer is None and any(stops):
            raise errors.InvalidOptionError("stop strings need a tokenizer; this model has none (pass tokenizer=)")
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.matcher = StopMatcher(stops)
        self.stop_tokens = set(int_values(stop_tokens, "stop_tokens"))
        self.taken = 0
        self.finish_reason: str | None = None

    def take(self, batch: Any, seq: int, token: int) -> str:
        """Handles sequence `seq`'s drawn `token` in the core `batch`: records it (or
        drops it, a stop token) and returns the text it completes ("" for none). Once
        `finish_reason` is set, the sequence is stopped in the batch."""
        if token in self.stop_tokens:
            batch.stop(seq, False)
            self.finish_reason = "stop"
            return ""
        # Taken: listed in `given` and, once the run ends, fed (one native call, so
        # Ctrl-C cannot fall between the two).
        batch.record(seq, token, (self.tokenizer.token_bytes(token) if self.tokenizer is not None else None) or b"")
        self.taken += 1
        text, stopped = self.matcher.push(self.decoder.push(token) if self.decoder is not None else "")
        if stopped:
            self.finish_reason = "stop"
        elif self.taken >= self.max_tokens:
            self.finish_reason = "length"
            tail, stopped = self.matcher.push(self.decoder.finish() if self.decoder is not None else "")
            if stopped:
                self.finish_reason = "stop"
            text += tail + self.matcher.flush()
        if self.finish_reason is not None:
            batch.stop(seq, True)
        return text


def sampler_for(model: Model, sampling: Sampling) -> Sampler:
    """A sampler over the model's vocabulary; ids past the tokenizer's (World:
    65530..65535) have no text and are banned."""
    vocab = model.config["vocab_size"]
    tokenizer = model._tokenizer_if_any()
    return Sampler(vocab, sampling if tokenizer is None else sampling.with_bans(range(tokenizer.vocab_size, vocab)))


class BatchRun:
    """Generations stepped together: each step feeds every live sequence in one forward
    call, then each draws with its own sampler. Sequence i samples with seed + i when a
    seed is given, so that copies of one prompt draw differently yet reproducibly.
    `Run` is a BatchRun of one."""

    def __init__(
        self,
        model: Model,
        prompts: Sequence[str | Tokens],
        states: Sequence[State] | None,
        max_tokens: int,
        sampling: Sampling,
        stop: Sequence[str] | str,
        stop_tokens: Sequence[int],
    ) -> None:
        if isinstance(prompts, str):
            raise errors.ShapeError("prompts must be a list of prompts (texts or token lists)")
        self.tokenizer = model._tokenizer_if_any()
        self.ids = [model._prompt_ids(p) for p in prompts]
        if not self.ids:
            raise errors.ShapeError("prompts is empty: give at least one prompt")
        self.texts = [TextStream(self.tokenizer, max_tokens, stop, stop_tokens) for _ in self.ids]
        if states is None:
            self.states = model.new_states(len(self.ids))
        else:
            self.states = list(states)
            if len(self.states) != len(self.ids):
                raise errors.ShapeError(f"{len(self.ids)} prompts but {len(self.states)} states: give one state per prompt")
            for state in self.states:
                model._check_state(state)
        samplers = [sampler_for(model, replace(sampling, seed=item_seed(sampling.seed, i))) for i in range(len(self.ids))]
        self._start(model, [(s, smp, ids) for s, smp, ids in zip(self.states, samplers, self.ids)])

    def _start(self, model: Model, runs: list[tuple[State, Sampler, list[int]]]) -> None:
        self._given_at_close: list[list[int]] = [[] for _ in runs]
        core = model._m.batch()
        self._seqs = [core.add(state._core, sampler._core, ids) for state, sampler, ids in runs]
        self._core: Any = core
        model._live_runs.add(self)

    @property
    def finish_reasons(self) -> list[str | None]:
        return [t.finish_reason for t in self.texts]

    @property
    def tokens(self) -> list[list[int]]:
        """Each sequence's tokens drawn and handed out so far: exactly those fed into its
        state after the prompt once the run ends, however it ends (Ctrl-C included)."""
        if self._core is None:
            return self._given_at_close
        return [list(self._core.given(seq)) for seq in self._seqs]

    def _close(self) -> None:
        """The model is closing: drop the native batch (and its hold on the model's
        memory); sequences still going end with finish_reason "closed"."""
        if self._core is not None:
            self._given_at_close = self.tokens
        self._core = None

    def __iter__(self) -> Iterator[tuple[int, str]]:
        """(sequence index, text piece) as each sequence produces text; afterwards
        `tokens[i]` and `finish_reasons[i]` describe each sequence. Leaving the loop early
        is clean: every state then holds its prompt and the tokens drawn so far."""
        index = {seq: i for i, seq in enumerate(self._seqs)}
        try:
            while any(t.finish_reason is None for t in self.texts):
                if self._core is None:
                    for t in self.texts:
                        t.finish_reason = t.finish_reason or "closed"
                    return
                stepped = self._core.step()
                if not stepped:  # nothing left to feed: cannot happen while a sequence runs
                    break
                for seq, token, _, _, _ in stepped:
                    if self._core is None:  # closed while a piece was out
                        break
                    i = index[seq]
                    text = self.texts[i].take(self._core, seq, token)
                    if text:
                        yield i, text
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

    def fed_tokens(self, i: int = 0) -> list[int]:
        """The tokens fed into sequence i's state by this run, in order."""
        return list(self._core.fed(self._seqs[i]))


class Run(BatchRun):
    """One generation; iterate it for text pieces. Afterwards `finish_reason`,
    `tokens` (drawn) and `prompt_tokens` describe what happened."""

    def __init__(
        self,
        model: Model,
        prompt: str | Tokens,
        state: State | None,
        max_tokens: int,
        sampling: Sampling,
        stop: Sequence[str] | str,
        stop_tokens: Sequence[int],
        cache: StateCache | None,
    ) -> None:
        self.tokenizer = model._tokenizer_if_any()
        self.texts = [TextStream(self.tokenizer, max_tokens, stop, stop_tokens)]
        sampler = sampler_for(model, sampling)
        ids = model._prompt_ids(prompt)
        self.ids = [ids]
        if cache is not None and state is None:
            self.state, rest = cache.resume(model, ids)
        else:
            self.state, rest = model._start_state(state), ids
        self.prompt_tokens = len(ids)
        self._start(model, [(self.state, sampler, rest)])

    @property
    def finish_reason(self) -> str | None:
        return self.texts[0].finish_reason

    @property
    def tokens(self) -> list[int]:  # type: ignore[override]
        return super().tokens[0]

    def __iter__(self) -> Generator[str, None, None]:  # type: ignore[override]
        for _, text in super().__iter__():
            yield text
