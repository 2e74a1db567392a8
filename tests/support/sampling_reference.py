"""NumPy reference of the official sampler (rwkv pip package 0.8.32). Test oracle only.

Transcribes docs/rwkv7.md, "Sampling as the official package does it":
`PIPELINE.sample_logits` on its CPU (numpy) path, float32 like the official, and the
penalty bookkeeping of `PIPELINE.generate`. Written from the spec, not copied.

`official_probs(..., like_rust=False)` is the literal algorithm, quirks included.
`like_rust=True` makes the choices src/sampler.rs documents, so that the Rust sampler can
be compared with it on any input (measured: same support, probabilities within 1e-6 of
the largest, on 220 cases up to 65536 tokens):
- top_p never reached by the float32 running sum: the official's `argmax` of an all-false
  mask picks index 0 and the draw turns greedy (on a 65536 vocabulary the float32 sum of
  all probabilities nearly always stalls just below 1, so top_p=1 is greedy there);
  fixed, nothing is cut, and top_p=1 always means off (where the float32 sum overshoots
  1, the official would cut the last few tokens).
- the temperature power underflowing every kept probability (tiny temperatures): fixed,
  the power is taken relative to the largest kept probability, in float64.
- the running sum in float64, not float32. On flat 65536-token distributions at top_p
  0.85-0.99 the official's float32 sum drifts by ~1e-6..1e-5, which moves its cutoff by
  a few tail tokens (about 2e-5 of mass in all) against an exact sum.
Both versions break top-k ties at the k-th place towards the lowest token ids (the
official's argsort order among ties is unspecified), as the Rust sampler does.
"""
import numpy as np

FREE_TEXT = " \t0123456789"


def softmax32(logits):
    x = np.asarray(logits, np.float32)
    e = np.exp(x - x.max())
    return (e / e.sum()).astype(np.float32)


def official_probs(logits, temperature=1.0, top_p=0.85, top_k=0, like_rust=False):
    """The distribution the official draws from (what it hands np.random.choice), float64."""
    if temperature == 0:  # greedy, the official way: tied maxima survive
        temperature, top_p = 1.0, 0.0
    probs = softmax32(logits)
    ids = np.arange(len(probs))
    # Ascending by probability; among ties the higher id first, so that the top_k kept
    # (the last ones) are the lowest ids. Tie order does not change the running sums.
    ascending = np.lexsort((-ids, probs))
    descending = probs[ascending][::-1]
    # One addition after another: float32 in the official (numpy then compares with top_p
    # made float32 too), float64 in Rust.
    running = np.cumsum(descending.astype(np.float64) if like_rust else descending)
    reached = running >= np.float32(top_p)
    if like_rust and (top_p >= 1 or not reached.any()):
        cutoff = 0.0
    else:
        cutoff = float(descending[np.argmax(reached)])
    probs[probs < cutoff] = 0
    if 0 < top_k < len(probs):
        probs[ascending[:-top_k]] = 0
    if temperature != 1.0:
        if like_rust:
            # float64 power, float32 weights, as in Rust
            probs = ((probs.astype(np.float64) / probs.max()) ** (1.0 / temperature)).astype(np.float32)
        else:
            probs = probs ** np.float32(1.0 / temperature)
    if like_rust:
        probs = probs.astype(np.float64)  # Rust normalises in float64
    return np.asarray(probs / np.sum(probs), np.float64)


def draw(probs, u):
    """np.random.choice's inverse CDF for a uniform u in [0, 1): the id walk the Rust
    sampler also does (it scales u by the total instead of normalising the CDF)."""
    cdf = np.cumsum(probs)
    return int(np.searchsorted(cdf / cdf[-1], u, side="right"))


def is_free(text):
    """The official counts a token 0 when its text is a substring of " \\t0123456789"
    (the empty string included). Bytes that are not UTF-8 decode to U+FFFD, as there."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            text = "\ufffd"
    return text in FREE_TEXT


class Penalties:
    """`generate`'s bookkeeping: counts start empty and see generated tokens only.

    Pass the alphas as the Rust side holds them (float(np.float32(x))) to compare exactly.
    """

    def __init__(self, presence=0.5, frequency=0.5, decay=0.996, banned=(0,), bias=()):
        self.presence, self.frequency, self.decay = presence, frequency, decay
        self.banned = list(banned)
        self.bias = list(bias)  # (token, float32 bias): the Rust side's extension
        self.counts = {}  # token -> Python float, like the official's `occurrence`

    def apply(self, logits):
        """Penalised float32 copy of `logits`: bias (Rust only), bans to -inf, then for
        every token seen (count 0 included) minus presence + count * frequency, a float
        subtracted in float32 (as torch does a Python float from a float32 tensor)."""
        out = np.array(logits, np.float32)
        for t, b in self.bias:
            out[t] = out[t] + np.float32(b)
        for t in self.banned:
            out[t] = -np.inf
        for t, count in self.counts.items():
            out[t] = out[t] - np.float32(self.presence + count * self.frequency)
        return out

    def record(self, token, text):
        """After a draw: every count decays, then the drawn token counts 1 (0 if free)."""
        for t in self.counts:
            self.counts[t] *= self.decay
        self.counts[token] = self.counts.get(token, 0.0) + (0.0 if is_free(text) else 1.0)
