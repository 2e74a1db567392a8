"""The work a forward pass records, counted by the runtime itself (`_m.last_stats()`:
queue submissions, compute dispatches, read-backs), so that fusions cannot silently
regress. Per layer, decode and each prefill chunk record 11 dispatches:

    ln1, token shift (6 mixes), r/k/v (one grouped matmul), the four low-rank first
    stages (one), their second stages (one), wkv7, output (+ residual), ln2, token shift
    (ffn), ffn key (relu^2), ffn value (+ residual)

plus ln0 once per chunk and ln_out + one head matmul per head row chunk for the tokens
whose logits are read. Target (issue 6): at most 16 per layer for decode, one
submission and one read-back per generated token.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA, open_model

PER_LAYER = 11
TINY = DATA / "tiny-rwkv7" / "model.safetensors"


@pytest.fixture(scope="module", params=["fp16", "int8", "nf4"])
def model(request):
    return open_model(TINY, dtype=request.param)


def stats(model):
    submissions, dispatches, readbacks, _ = model._m.last_stats()
    return submissions, dispatches, readbacks


def test_decode_step_counts(model):
    layers = model.config["n_layer"]
    state = model.new_state()
    model.forward([5], state)
    submissions, dispatches, readbacks = stats(model)
    assert (submissions, readbacks) == (1, 1)
    assert dispatches == PER_LAYER * layers + 3  # + ln0, ln_out, head
    assert model._m.last_stats()[3] == PER_LAYER * layers <= 16 * layers


def test_prefill_counts_per_chunk(model):
    layers = model.config["n_layer"]
    state = model.new_state()
    model.forward(list(range(300)), state)  # chunks of 256 + 44 tokens
    submissions, dispatches, readbacks = stats(model)
    assert (submissions, readbacks) == (2, 1)
    assert dispatches == 2 * (PER_LAYER * layers + 1) + 2
    assert model._m.last_stats()[3] == 2 * PER_LAYER * layers
    model.prefill(list(range(10)), state)
    assert stats(model) == (1, PER_LAYER * layers + 1, 0)


def test_split_matrices_fall_back_to_one_dispatch_per_chunk():
    """With a 64 KiB binding limit the tiny model's r/k/v (3 x 32 KiB) no longer share a
    buffer and its ffn matrices and head ([512, 128] fp16 = 128 KiB) are split: more
    dispatches, one submission, the same logits."""
    small = open_model(TINY, max_binding=65536)
    whole = open_model(TINY)
    a, b = small.new_state(), whole.new_state()
    np.testing.assert_array_equal(small.forward([1, 2, 3], a), whole.forward([1, 2, 3], b))
    layers = small.config["n_layer"]
    # Per layer: r, k, v apart (+2), ffn key and value in two chunks each (+2); head +1.
    assert stats(small) == (1, stats(whole)[1] + 4 * layers + 1, 1)


def test_scratch_does_not_grow_with_the_prompt():
    """A prefill of 512 tokens that wants the last logits holds the same scratch as a
    one-token call (benches/memory.py relies on this)."""
    m = open_model(TINY)
    m.forward([1], m.new_state())
    one = m.memory()["scratch"]
    m.forward(list(range(512)), m.new_state())
    assert m.memory()["scratch"] == one


@pytest.mark.parametrize("options", [{}, {"max_binding": 65536}, {"dtype": "int8", "quant_head": True}], ids=["one-head-chunk", "split-head", "int8-head"])
def test_argmax_on_the_device_matches_the_logits(options):
    """Greedy decoding on the device picks numpy.argmax of the logits the same model
    computes, step after step, also when the head is split into row chunks."""
    m = open_model(TINY, **options)
    a, b = m.new_state(), m.new_state()
    token = 7
    for _ in range(6):
        logits = m.forward([token], a)
        chosen = m.forward_argmax([token], b)
        assert chosen == int(np.argmax(logits))
        assert stats(m)[2] == 1
        token = chosen
    np.testing.assert_array_equal(a.to_numpy()["wkv"], b.to_numpy()["wkv"])


def test_profiling_times_every_dispatch():
    """With profiling on, each dispatch of the call is timed under its kernel's name;
    off, nothing is recorded (and the results are the same either way)."""
    m = open_model(TINY, dtype="nf4")
    plain = m.forward([3, 4], m.new_state())
    assert m._m.last_profile() == []
    can_time = m._m.set_profiling(True)
    try:
        timed = m.forward([3, 4], m.new_state())
    finally:
        m._m.set_profiling(False)
    np.testing.assert_array_equal(plain, timed)
    profile = m._m.last_profile()
    if not can_time:  # no timestamp queries on this adapter: nothing is claimed
        assert profile == []
        return
    assert len(profile) == stats(m)[1]
    kernels = {name.split(":")[0] for name, _ in profile}
    assert kernels == {"layer_norm", "token_shift", "matmul", "wkv7"}
    assert any("WEIGHT_NF4" in name for name, _ in profile)
    assert all(ns >= 0 for _, ns in profile) and sum(ns for _, ns in profile) > 0


def test_scratch_bytes_follow_the_plan():
    """Scratch for one chunk of T tokens, exactly: the residual, the mixes, r/k/v, the
    low-rank hidden and v_first; one buffer for emb/xn/att and one for lora/ffn (never
    alive at the same time); the sequence table and argmax results; one token's logits
    and its read-back buffer."""
    m = open_model(TINY)
    m.forward([1], m.new_state())
    cfg = m.config
    c, f, v = cfg["n_embd"], cfg["ffn_size"], cfg["vocab_size"]
    dsum = sum(cfg["lora_widths"])
    widest = max(6 * c, f, dsum)
    t = min(256, cfg["max_binding"] // (4 * widest))
    floats = t * c * (1 + 1 + 6 + 3 + 1) + t * dsum + t * max(4 * c, f)
    # The sequence table and argmax results: 64 sequences of 16 and 8 bytes.
    assert m.memory()["scratch"] == 4 * floats + 64 * 16 + 64 * 8 + 2 * 4 * v
