"""Self-tests of the NumPy sampling reference (tests/support/sampling_reference.py): NumPy only.

The cases are the ones src/sampler.rs tests, with the same expected numbers, so that the
two implementations are pinned to one arithmetic before the bindings compare them.
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import sampling_reference as ref  # noqa: E402


def logits_of(weights):
    """Logits whose softmax is proportional to `weights`."""
    return np.log(np.asarray(weights, np.float64)).astype(np.float32)


def close(got, want):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want / want.sum(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("like_rust", [False, True])
def test_greedy_keeps_tied_maxima(like_rust):
    close(ref.official_probs([0.1, 3.0, -2.0, 2.9, 0.0], temperature=0, like_rust=like_rust), [0, 1, 0, 0, 0])
    close(ref.official_probs([1.0, 5.0, 5.0, 0.0], temperature=0, like_rust=like_rust), [0, 1, 1, 0])


@pytest.mark.parametrize("like_rust", [False, True])
def test_top_p_cutoff_keeps_ties(like_rust):
    # 0.4, 0.2, 0.2, 0.2: the sum reaches 0.5 at the first 0.2, so every 0.2 survives.
    close(ref.official_probs(logits_of([0.4, 0.2, 0.2, 0.2]), top_p=0.5, like_rust=like_rust), [0.4, 0.2, 0.2, 0.2])
    logits = logits_of([0.3, 0.5, 0.2])
    close(ref.official_probs(logits, top_p=0.45, like_rust=like_rust), [0, 1, 0])
    close(ref.official_probs(logits, top_p=0.6, like_rust=like_rust), [0.3, 0.5, 0])
    close(ref.official_probs(logits, top_p=0.0, like_rust=like_rust), [0, 1, 0])


def test_top_k_after_top_p_and_ties_keep_lowest_ids():
    logits = logits_of([0.1, 0.4, 0.2, 0.3])
    close(ref.official_probs(logits, top_p=1.0, top_k=2, like_rust=True), [0, 0.4, 0, 0.3])
    close(ref.official_probs(logits, top_p=0.6, top_k=3), [0, 0.4, 0, 0.3])
    close(ref.official_probs(logits, top_p=0.6, top_k=1), [0, 1, 0, 0])
    close(ref.official_probs(logits_of([0.2, 0.3, 0.2, 0.3]), top_p=1.0, top_k=3, like_rust=True), [0.2, 0.3, 0, 0.3])


@pytest.mark.parametrize("like_rust", [False, True])
def test_temperature_comes_after_truncation(like_rust):
    # At temperature 1, 0.5 + 0.3 reach top_p 0.6; sharpened first, only 0.5 would.
    logits = logits_of([0.5, 0.3, 0.2])
    close(ref.official_probs(logits, temperature=0.5, top_p=0.6, like_rust=like_rust), [0.25, 0.09, 0])
    close(ref.official_probs(logits, temperature=2.0, top_p=0.99, like_rust=like_rust), np.sqrt([0.5, 0.3, 0.2]))


def test_like_rust_top_p_one_is_off_not_greedy():
    # On 65536 tokens the float32 running sum stalls below 1: the literal official goes greedy.
    logits = (np.random.default_rng(0).standard_normal(65536) * 2).astype(np.float32)
    literal = ref.official_probs(logits, top_p=1.0)
    assert np.count_nonzero(literal) == 1 and literal[np.argmax(logits)] == 1
    np.testing.assert_allclose(ref.official_probs(logits, top_p=1.0, like_rust=True), ref.softmax32(logits), rtol=1e-6)


def test_like_rust_tiny_temperature_does_not_underflow():
    logits = logits_of([0.5, 0.3, 0.2])
    with np.errstate(invalid="ignore"):
        assert np.isnan(ref.official_probs(logits, temperature=0.001, top_p=1.0)).all()
    close(ref.official_probs(logits, temperature=0.001, top_p=1.0, like_rust=True), [1, 0, 0])


def test_penalties_decay_then_count():
    p = ref.Penalties(presence=0.5, frequency=0.25, decay=0.5, banned=[])
    for token, text in [(3, "hi"), (3, "hi"), (5, " "), (6, "12"), (7, "  "), (3, "hi")]:
        p.record(token, text)
    # 3: (1 * 0.5 + 1) * 0.5^4 + 1; 5 and 6 are free text (count 0); 7: 1 * 0.5.
    assert p.counts == {3: 1.09375, 5: 0.0, 6: 0.0, 7: 0.5}
    want = np.float32([1, 1, 1, 1 - 0.5 - 1.09375 * 0.25, 1, 0.5, 0.5, 1 - 0.5 - 0.125])
    np.testing.assert_array_equal(p.apply(np.ones(8, np.float32)), want)
    banned = ref.Penalties(banned=[0, 2], bias=[(1, -1.0), (2, 5.0)]).apply(np.float32([10, 2, 9]))
    np.testing.assert_array_equal(banned, np.float32([-np.inf, 1, -np.inf]))


def test_free_text_is_a_substring_rule():
    assert all(ref.is_free(t) for t in ["", " ", "\t", "12", "\t0", "789", " \t0123456789", b"3"])
    assert not any(ref.is_free(t) for t in ["  ", " 1", "a", "10", "\n", b"\xff"])


def test_draw_is_the_inverse_cdf():
    probs = np.array([0.0, 0.25, 0.0, 0.75])
    assert [ref.draw(probs, u) for u in (0.0, 0.2499, 0.25, 0.9999)] == [1, 1, 3, 3]
