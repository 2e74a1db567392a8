"""The decode value projection split along K (src/model/ops.rs Split): each layer's but
the last writes RWKV_GPU_SPLIT_K partial sums, the next layer's ln_shift folds them into
the residual stream. Only decode chunks (every token its sequence's first) split; the
parts add the same products in another order, so results move by float rounding only.

Tolerances: TOL (1e-3) against the official logits, as tests/test_golden.py; split
against unsplit 1e-4 (both are f32 sums of the same products; ~5e-6 measured).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA, open_model

TOL = 1e-3
TINY = DATA / "tiny-rwkv7" / "model.safetensors"
TRAINED = DATA / "trained-bytes" / "model.safetensors"
PROMPT = list(b"The quick brown fox jumps over the lazy dog. ")


def load(monkeypatch, path, parts, **options):
    monkeypatch.setenv("RWKV_GPU_SPLIT_K", str(parts))
    model = open_model(path, **options)
    assert model.config["split_k"] == parts  # (NF4 models still time their NF4 decoding)
    return model


def decode_dispatches(model, state):
    """The labels of one decode step's dispatches, or None without timestamp queries."""
    if not model._m.set_profiling(True):
        return None
    try:
        model.forward([1], state)
        return [name for name, _, _ in model._m.last_profile()]
    finally:
        model._m.set_profiling(False)


@pytest.mark.parametrize("parts", [2, 4, 8])
def test_split_decode_matches_the_official_logits(monkeypatch, tiny_cases, parts):
    """Step by step through the prompt (the tiny model: 2 layers, K = 512): within TOL
    of the official logits, and bit-identical from one run to the next."""
    model = load(monkeypatch, TINY, parts)
    runs = []
    for _ in range(2):
        state = model.new_state()
        runs.append(np.stack([model.forward([t], state) for t in tiny_cases["prompt"]]))
    np.testing.assert_allclose(runs[0], tiny_cases["prompt_logits"], atol=TOL, rtol=0)
    assert np.array_equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype", ["fp16", "int8", "nf4"])
def test_split_decode_of_the_trained_model_and_what_splits(monkeypatch, dtype):
    """The trained model (4 layers, sparse activations) in each format: split decode
    within 1e-4 of unsplit, single sequences and a batch of three alike; the 3 layers
    after the first fold parts in a decode step. A prefill and a batch where one
    sequence has two tokens do not split: bit-identical to unsplit."""
    out, folds = {}, {}
    for parts in (1, 4):
        model = load(monkeypatch, TRAINED, parts, dtype=dtype)
        state = model.new_state()
        steps = np.stack([model.forward([t], state) for t in PROMPT])
        states = model.new_states(3)  # one state page: one chunk for the batch
        model.forward_batch([PROMPT[:5], PROMPT[5:9], PROMPT[9:20]], states)
        batch = model.forward_batch([[7], [70], [101]], states)
        uneven = model.forward_batch([[7, 8], [70], [101]], model.new_states(3))
        prefill = model.forward(PROMPT, model.new_state(), all_logits=True)
        out[parts] = steps, np.stack(batch), np.stack(uneven), prefill
        names = decode_dispatches(model, state)
        folds[parts] = None if names is None else sum(n.endswith(" fold") for n in names)
        model.close()
    np.testing.assert_allclose(out[4][0], out[1][0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[4][1], out[1][1], atol=1e-4, rtol=0)
    # The split path ran: the sums differ in their last bits somewhere.
    assert not np.array_equal(out[4][0], out[1][0])
    assert np.array_equal(out[4][2], out[1][2]) and np.array_equal(out[4][3], out[1][3])
    if folds[1] is not None:
        assert folds == {1: 0, 4: 3}


def test_split_reads_the_same_rows(monkeypatch):
    """The sparse kernel's read counts (what --profile reports) do not depend on the
    split: each part counts the groups of its own inputs."""
    counts = {}
    for parts in (1, 2, 4):
        model = load(monkeypatch, TRAINED, parts)
        state = model.new_state()
        model.forward(PROMPT[:10], state)
        model._m.take_read_counts()
        model._m.set_counting_reads(True)
        for t in PROMPT[10:20]:
            model.forward([t], state)
        model._m.set_counting_reads(False)
        counts[parts] = model._m.take_read_counts()
        model.close()
    assert counts[1] == counts[2] == counts[4]
    read, groups = sum(c[0] for c in counts[1]), sum(c[1] for c in counts[1])
    assert 0 < read < groups  # real sparsity: some groups skipped, some read


def test_the_parts_buffer_is_made_only_for_a_split(monkeypatch):
    """Scratch grows by the parts buffer, (8 parts, 16 tokens, C) floats, once a model
    that splits runs; a model that does not split has none (tests/test_work_counts.py
    counts the rest of scratch)."""
    scratch = {}
    for parts in (1, 2):
        model = load(monkeypatch, TINY, parts)
        model.forward([1], model.new_state())
        scratch[parts] = model.memory()["scratch"]
        c = model.config["n_embd"]
        model.close()
    assert scratch[2] - scratch[1] == 4 * 8 * 16 * c
