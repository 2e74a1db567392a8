"""Several sequences in one forward call (`Model.forward_batch`): each sequence's tokens
go through the same passes over the weights, with its own state.

Tolerances: the official outputs are matched at 1e-3 absolute as in test_golden.py (a
correct runtime lands near 1e-5). Batch against one-at-a-time runs of the same model:
1e-4 absolute, as test_golden's prefill-versus-steps check, because a batch may take the
other matmul kernel for a sequence (a 1-token sequence in a chunk of more than 16 tokens
goes through the tiled kernel), which sums in another order (we see ~5e-7).
"""

from __future__ import annotations

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, FALLBACKS, open_model

TINY = DATA / "tiny-rwkv7" / "model.safetensors"
TOL_OFFICIAL = 1e-3
TOL_SELF = 1e-4
# Dispatches per layer of a decode step: up to 4 sequences 7 (the WKV kernel computes the
# low-rank second stages), more 8 (those as one matmul for the whole batch).
DECODE_PER_LAYER = {1: 7, 4: 7, 16: 8, 64: 8}


def others(n, length, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, size=int(length(i))).tolist() for i in range(n)]


def assert_states_close(a, b, tol, what=""):
    sa, sb = a.to_numpy(), b.to_numpy()
    for name in sa:
        np.testing.assert_allclose(sa[name], sb[name], atol=tol, rtol=0, err_msg=f"{what} {name}")


@pytest.mark.parametrize("fallback", list(FALLBACKS))
def test_batch_matches_official_beside_other_sequences(fallback, tiny_cases):
    """The golden prompt fed as the middle sequence of three, then its golden steps fed
    one token at a time beside two other sequences, gives the official logits and
    states. With max_binding_64k chunks hold 21 tokens, so all three sequences are cut
    across chunks."""
    c = tiny_cases
    model = open_model(TINY, **FALLBACKS[fallback])
    prompt = c["prompt"].tolist()
    before, after = others(2, lambda i: 13 + 17 * i, seed=3)
    states = model.new_states(3)
    logits = model.forward_batch([before, prompt, after], states, all_logits=True)
    assert [x.shape for x in logits] == [(13, 512), (37, 512), (30, 512)]
    np.testing.assert_allclose(logits[1], c["prompt_logits"], atol=TOL_OFFICIAL, rtol=0)
    got = states[1].to_numpy()
    for name in ("att_shift", "wkv", "ffn_shift"):
        np.testing.assert_allclose(got[name], c[f"prefill_{name}"], atol=TOL_OFFICIAL, rtol=0, err_msg=name)
    for i, token in enumerate(c["step_tokens"]):
        step = model.forward_batch([[7 + i], [int(token)], [300 - i]], states)
        assert step.shape == (3, 512)
        np.testing.assert_allclose(step[1], c["step_logits"][i], atol=TOL_OFFICIAL, rtol=0, err_msg=f"step {i}")
    got = states[1].to_numpy()
    for name in ("att_shift", "wkv", "ffn_shift"):
        np.testing.assert_allclose(got[name], c[f"final_{name}"], atol=TOL_OFFICIAL, rtol=0, err_msg=name)
    model.close()


@pytest.mark.parametrize("dtype", ["fp16", "int8", "nf4"])
def test_batch_equals_one_at_a_time(monkeypatch, dtype):
    """Ragged prompts (1 to 300 tokens: one of them spans two 256-token chunks, the size
    set on GPUs too; the tiled kernel), then decode steps of 5 sequences and of 3
    (matvec), against the same calls one sequence at a time."""
    monkeypatch.setenv("RWKV_GPU_CHUNK_TOKENS", "256")
    model = open_model(TINY, dtype=dtype)
    prompts = others(5, lambda i: [1, 300, 9, 40, 2][i], seed=5)
    singles = [model.new_state() for _ in prompts]
    want = [model.forward(p, s, all_logits=True) for p, s in zip(prompts, singles)]
    batch = model.new_states(5)
    got = model.forward_batch(prompts, batch, all_logits=True)
    for i, (a, b) in enumerate(zip(want, got)):
        np.testing.assert_allclose(b, a, atol=TOL_SELF, rtol=0, err_msg=f"sequence {i}")
    for step in range(3):
        live = range(5) if step == 0 else range(3)
        tokens = [[(11 * i + step) % 512] for i in live]
        want = np.stack([model.forward(t, singles[i]) for t, i in zip(tokens, live)])
        got = model.forward_batch(tokens, [batch[i] for i in live])
        np.testing.assert_allclose(got, want, atol=TOL_SELF, rtol=0, err_msg=f"step {step}")
    for i in range(5):
        assert_states_close(batch[i], singles[i], TOL_SELF, f"sequence {i}")


def test_argmax_batch_is_the_argmax_of_the_batch_logits(tiny_model):
    """Device argmax per sequence equals numpy.argmax of the same batch's logits, from
    copies of the same states (bit-identical inputs: the same kernels run)."""
    prompts = others(4, lambda i: 3 + i, seed=8)
    states = tiny_model.new_states(4)
    tiny_model.forward_batch(prompts, states)
    copies = tiny_model.new_states(4)
    for s, c in zip(states, copies):
        tiny_model._m.copy_state(s._core, c._core)
    for step in range(3):
        tokens = [[(5 * i + 3 * step) % 512] for i in range(4)]
        ids = tiny_model.forward_argmax_batch(tokens, states)
        logits = tiny_model.forward_batch(tokens, copies)
        assert ids == np.argmax(logits, axis=1).tolist()


def test_a_decode_step_reads_the_weights_once_whatever_the_batch(tiny_model):
    """A decode step records the same 7 (up to 4 sequences) or 8 dispatches per layer
    (each matrix read once) for 1, 4, 16 and 64 sequences; one submission and one
    read-back per step."""
    layers = tiny_model.config["n_layer"]
    for n in (1, 4, 16, 64):
        states = tiny_model.new_states(n)
        tiny_model.forward_batch([[i % 512] for i in range(n)], states)
        counts = [tiny_model._m.last_stats()]
        tiny_model.forward_argmax_batch([[1]] * n, states)
        counts.append(tiny_model._m.last_stats())
        for submissions, _dispatches, readbacks, layer_dispatches in counts:
            assert (submissions, readbacks) == (1, 1)
            assert layer_dispatches == DECODE_PER_LAYER[n] * layers, n


def test_states_on_separate_pages_still_run_and_are_counted():
    """States from separate new_state() calls may sit in different device blocks: the
    call then takes one pass per block (here 3 blocks for 4 states: 1 + 2 + 4 slots),
    with the same results."""
    tiny_model = open_model(TINY)
    states = [tiny_model.new_state() for _ in range(4)]
    tokens = [[3], [4], [5], [6]]
    copies = tiny_model.new_states(4)
    got = tiny_model.forward_batch(tokens, states)
    assert tiny_model._m.last_stats()[0] == 3
    want = tiny_model.forward_batch(tokens, copies)
    assert tiny_model._m.last_stats()[0] == 1
    np.testing.assert_allclose(got, want, atol=TOL_SELF, rtol=0)


def test_batch_hidden_states_match_embed_one_by_one(tiny_model):
    """embed() now feeds its texts as one batch: the same vectors as one call each."""
    texts = others(3, lambda i: 4 + 9 * i, seed=9)
    for pooling in ("last", "mean"):
        together = tiny_model.embed(texts, pooling=pooling)
        alone = np.stack([tiny_model.embed(t, pooling=pooling) for t in texts])
        np.testing.assert_allclose(together, alone, atol=TOL_SELF, rtol=0, err_msg=pooling)


def test_new_states_start_from_the_initial_state_and_free_their_memory():
    model = open_model(TINY)
    init = model.new_state()
    model.forward([1, 2, 3], init)
    model.initial_state = init
    before = model.memory()["states"]
    states = model.new_states(5)
    for state in states:
        assert_states_close(state, init, 0.0)
    assert model.memory()["states"] >= before + 5 * 2 * (2 * 128 + 128 * 64) * 4
    del states, state
    # Their block of slots went back to the device.
    assert model.memory()["states"] == before
    model.close()


def test_bad_batches_raise_and_change_nothing(tiny_model):
    states = tiny_model.new_states(2)
    tiny_model.forward_batch([[1, 2], [3]], states)
    before = [s.to_numpy() for s in states]
    other = open_model(TINY)
    cases = [
        (([[1], [2]], states[:1]), rwkv_gpu.ShapeError, "one state per sequence"),
        (([], []), rwkv_gpu.ShapeError, "empty"),
        (([[1], [600]], states), rwkv_gpu.ShapeError, "sequence 1"),
        (([[1], []], states), rwkv_gpu.ShapeError, "sequence 1"),
        (([[1], [-1]], states), rwkv_gpu.ShapeError, "sequence 1: token id -1 at position 0"),
        (([[2**40]], states[:1]), rwkv_gpu.ShapeError, "^token id 1099511627776 at position 0 is out of range"),
        (([[1], [2]], [states[0], states[0]]), rwkv_gpu.StateError, "same State"),
        (([[1], [2]], [states[0], other.new_state()]), rwkv_gpu.StateError, "another model"),
        (([1, 2], states), rwkv_gpu.ShapeError, "sequence 0"),
        (("ab", states), rwkv_gpu.ShapeError, "list of token lists"),
    ]
    for (tokens, sts), error, message in cases:
        with pytest.raises(error, match=message):
            tiny_model.forward_batch(tokens, sts)
    for s, b in zip(states, before):
        after = s.to_numpy()
        for name in b:
            assert np.array_equal(after[name], b[name]), name
    with pytest.raises(rwkv_gpu.ShapeError, match="positive"):
        tiny_model.new_states(0)
    other.close()
