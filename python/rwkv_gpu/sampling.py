"""Sampling options with the official RWKV semantics (docs: README "Sampling").

The draw itself runs in Rust (src/sampler.rs): top-p decided at temperature 1, then
top-k, then temperature; presence/frequency penalties over generated tokens only, decayed
before each increment; tokens whose text is whitespace or digits count 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import _core, errors
from ._values import int_value, int_values

# The defaults live in the core (src/sampler.rs, `SamplingOptions::default`); every Python
# path (generate, complete, batches, Chat, the Engine, the server, the CLIs) takes them
# from `Sampling`. f32 there: shown as the shortest decimal of that f32 (0.3, not 0.30000001).
_CORE_DEFAULTS = _core.sampling_defaults()


def _f32(value: float) -> float:
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class Sampling:
    """Defaults are the official RWKV-7 chat demo's. temperature 0 = greedy; top_p 1 and
    top_k 0 = off. `banned_tokens` get -inf; `logit_bias` maps token -> added logit
    (-inf bans); same `seed`, inputs, device and build give the same tokens."""

    temperature: float = _f32(_CORE_DEFAULTS["temperature"])
    top_p: float = _f32(_CORE_DEFAULTS["top_p"])
    top_k: int = int(_CORE_DEFAULTS["top_k"])
    presence_penalty: float = _f32(_CORE_DEFAULTS["presence_penalty"])
    frequency_penalty: float = _f32(_CORE_DEFAULTS["frequency_penalty"])
    penalty_decay: float = _f32(_CORE_DEFAULTS["penalty_decay"])
    banned_tokens: Sequence[int] = tuple(_CORE_DEFAULTS["banned_tokens"])  # kept as a tuple
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        """Each option is checked for its kind here, once (the core checks the ranges):
        a float 1.5 as `top_k` or text as a temperature is refused, not truncated or
        parsed. `logit_bias` may also be given as (token, bias) pairs."""
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "penalty_decay"):
            value = getattr(self, name)
            if not _is_number(value):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        int_value(self.top_k, "top_k")
        if self.seed is not None:
            int_value(self.seed, "seed")
        object.__setattr__(self, "banned_tokens", tuple(int_values(self.banned_tokens, "banned_tokens")))
        bias = self.logit_bias
        pairs = list(bias.items()) if isinstance(bias, Mapping) else _pairs(bias)
        for token, value in pairs:
            int_value(token, "a logit_bias token")
            if not _is_number(value):
                raise TypeError(f"logit_bias[{token}] must be a number, got {type(value).__name__} {value!r}")
        object.__setattr__(self, "logit_bias", {int(t): float(v) for t, v in pairs})

    def with_bans(self, extra: Iterable[int]) -> Sampling:
        return replace(self, banned_tokens=tuple(dict.fromkeys([*self.banned_tokens, *extra])))

    def sampler(self, vocab_size: int) -> Sampler:
        return Sampler(vocab_size, self)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _pairs(bias: Any) -> list[tuple[Any, ...]]:
    if not isinstance(bias, (str, bytes)):
        try:
            pairs = [tuple(pair) for pair in bias]
            if all(len(pair) == 2 for pair in pairs):
                return pairs
        except TypeError:
            pass
    raise TypeError(f"logit_bias must map token ids to numbers (a dict, or (token, bias) pairs), got {bias!r}")


def item_seed(seed: int | None, i: int) -> int | None:
    """The seed of item `i` of a batch or of `n` choices: seed + i, wrapped into the u64
    range the core takes (a negative seed wraps too), so that copies of one prompt draw
    differently yet reproducibly."""
    return None if seed is None else (int(seed) + i) % 2**64


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty",
                    "penalty_decay", "banned_tokens", "logit_bias", "seed")


def sampling_options(options: dict[str, Any], takes: tuple[str, ...] = ("stop", "stop_tokens", "cache")) -> dict[str, Any]:
    """Takes the sampling keywords out of `options`; anything else that the caller does
    not take itself (`takes`, left in `options`) is an error."""
    out = {k: options.pop(k) for k in _SAMPLING_FIELDS if k in options}
    unknown = set(options) - set(takes)
    if unknown:
        raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    if out.get("logit_bias") is None:
        out.pop("logit_bias", None)
    return out


def _f32_bytes(logits: np.ndarray, vocab: int) -> bytes:
    a = np.ascontiguousarray(logits, dtype=np.float32)
    if a.shape != (vocab,):
        raise errors.ShapeError(f"logits have shape {a.shape}; this sampler needs ({vocab},)")
    return a.tobytes()


class Sampler:
    """The sampler of one generation: options, penalty counts and random stream. Mostly
    for inspection and tests; `Model.generate` makes its own."""

    def __init__(self, vocab_size: int, options: Sampling | None = None) -> None:
        o = options or Sampling()
        self.vocab_size = int_value(vocab_size, "vocab_size")
        self.options = o
        self._core = _core.Sampler(
            self.vocab_size,
            temperature=float(o.temperature),
            top_p=float(o.top_p),
            top_k=int(o.top_k),
            presence_penalty=float(o.presence_penalty),
            frequency_penalty=float(o.frequency_penalty),
            penalty_decay=float(o.penalty_decay),
            banned=[int(t) for t in o.banned_tokens],
            logit_bias=[(int(t), float(b)) for t, b in o.logit_bias.items()],
            seed=None if o.seed is None else int(o.seed),
        )

    def apply_penalties(self, logits: np.ndarray) -> np.ndarray:
        """Logits after logit bias, bans and the presence/frequency penalties."""
        raw = self._core.apply_penalties(_f32_bytes(logits, self.vocab_size))
        return np.frombuffer(raw, dtype=np.float32).copy()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a draw from these (already penalised) logits follows."""
        raw = self._core.probabilities(_f32_bytes(logits, self.vocab_size))
        return np.frombuffer(raw, dtype=np.float32).copy()

    def sample(self, logits: np.ndarray) -> int:
        """Penalises the logits and draws a token (call `record` with it afterwards)."""
        return int(self._core.sample(_f32_bytes(logits, self.vocab_size)))

    def record(self, token: int, token_bytes: bytes) -> None:
        self._core.record(int_value(token, "token"), bytes(token_bytes))

    def counts(self) -> dict[int, float]:
        return dict(self._core.counts())

    def reset(self) -> None:
        self._core.reset()
