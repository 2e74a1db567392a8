"""Sparse decode of the channel mix's value projection (shaders/matmul_sparse.wgsl): the
matrix is stored input-major and decode skips the rows of inputs that are zero for every
sequence; prefill keeps the tiled GEMM on the same storage. RWKV_GPU_NO_SPARSE_FFN=1
keeps the dense layout: the comparison path.

Tolerances: fp16 weights are the same values in both layouts, so only the f32 summation
order differs (measured 3.8e-6 on logits of ~15): 1e-4. Quantized formats block the
input-major matrix along its outputs instead of its inputs, a different rounding of
the same quantizer: compared by KL divergence from the fp16 model, which a layout bug
(transposed codes, misplaced scales) would raise by orders of magnitude.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import DATA, open_model
from rwkv_gpu import ModelLoadError, bench

TRAINED = DATA / "trained-bytes" / "model.safetensors"
TINY = DATA / "tiny-rwkv7" / "model.safetensors"


def heldout(n, start=0):
    return list((DATA / "trained-bytes" / "heldout.txt").read_bytes()[start:start + n])


@pytest.fixture
def dense_ffn(monkeypatch):
    monkeypatch.setenv("RWKV_GPU_NO_SPARSE_FFN", "1")


def decode_logits(model, prompt, steps):
    """Logits of a prefill of `prompt`, then of each of `steps` fed one at a time."""
    state = model.new_state()
    out = [model.forward(prompt, state)]
    out += [model.forward([t], state) for t in steps]
    return np.array(out)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(p_logits, q_logits):
    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_value_projection_is_input_major_unless_asked(monkeypatch):
    model = open_model(TINY)
    assert [layout for layout, _ in model._m.ffn_value_storage()] == ["input-major"] * 2
    monkeypatch.setenv("RWKV_GPU_NO_SPARSE_FFN", "1")
    dense = open_model(TINY)
    assert [layout for layout, _ in dense._m.ffn_value_storage()] == ["output-major"] * 2
    # The same bytes either way.
    assert model.memory() == dense.memory()
    # Too big for a binding: the dense layout (chunks of rows), not chunks of inputs.
    monkeypatch.delenv("RWKV_GPU_NO_SPARSE_FFN")
    small = open_model(TINY, max_binding=65536)
    assert [layout for layout, _ in small._m.ffn_value_storage()] == ["output-major"] * 2


def test_golden_outputs_with_the_dense_layout(dense_ffn, tiny_cases):
    """The comparison path itself still gives the official outputs (the default path is
    tests/test_golden.py)."""
    c = tiny_cases
    model = open_model(TINY)
    state = model.new_state()
    np.testing.assert_allclose(model.forward(c["prompt"], state, all_logits=True), c["prompt_logits"], atol=1e-3, rtol=0)
    for i, token in enumerate(c["step_tokens"]):
        np.testing.assert_allclose(model.forward([int(token)], state), c["step_logits"][i], atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def dense_and_sparse_logits():
    """fp16/int8/nf4 decode logits of the trained model over held-out bytes, with the
    sparse path and with the dense one (a 64-byte prefill through the GEMM, 48 steps)."""
    import os

    prompt, steps = heldout(64), heldout(48, start=64)
    out = {}
    for dense in (False, True):
        if dense:
            os.environ["RWKV_GPU_NO_SPARSE_FFN"] = "1"
        try:
            for dtype in ("fp16", "int8", "nf4"):
                model = open_model(TRAINED, dtype=dtype)
                out[dtype, dense] = decode_logits(model, prompt, steps)
                model.close()
        finally:
            os.environ.pop("RWKV_GPU_NO_SPARSE_FFN", None)
    return out


def test_sparse_decode_equals_dense_in_fp16(dense_and_sparse_logits):
    got, want = dense_and_sparse_logits["fp16", False], dense_and_sparse_logits["fp16", True]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["int8", "nf4"])
def test_quantized_input_major_is_as_faithful_as_dense(dense_and_sparse_logits, dtype):
    """Measured KL from fp16: int8 7.4e-6 input-major vs 6.7e-6 dense, nf4 2.47e-3 vs
    2.32e-3. Bound: 1.5x the dense figure."""
    reference = dense_and_sparse_logits["fp16", True]
    sparse = kl(reference, dense_and_sparse_logits[dtype, False])
    dense = kl(reference, dense_and_sparse_logits[dtype, True])
    assert sparse <= 1.5 * dense + 1e-7, (sparse, dense)


def test_decode_reads_at_most_30_percent_of_the_value_weights():
    """On a trained model, single-sequence decode over held-out text: the counting
    variant's groups read (measured 20%), and the bench's bytes read per token."""
    model = open_model(TRAINED)
    state = model.new_state()
    model.prefill(heldout(32), state)
    steps = heldout(100, start=32)

    def decode():
        for t in steps:
            model.forward([t], state)

    reads = bench.sparse_reads(model, decode)
    assert reads is not None
    assert reads["groups_read"] <= 0.30, reads
    assert reads["zero_inputs"] > 0.85, reads  # measured 94%
    value_bytes = sum(nbytes for _, nbytes in model._m.ffn_value_storage())
    assert reads["dense_bytes_per_token"] == value_bytes
    assert reads["bytes_per_token"] <= 0.30 * value_bytes


def test_counts_see_every_layer_and_only_while_on():
    model = open_model(TRAINED)
    state = model.new_state()
    model._m.set_counting_reads(True)
    model.forward([1], state)
    model.forward([2], state)
    model._m.set_counting_reads(False)
    counts = model._m.take_read_counts()
    f = 4 * model.config["n_embd"]
    assert len(counts) == model.config["n_layer"]
    for read, groups, nonzero, inputs in counts:
        assert groups == 2 * f // 4 and inputs == 2 * f and 0 < read <= groups and 0 < nonzero <= inputs
    model.forward([3], state)
    assert all(c == (0, 0, 0, 0) for c in model._m.take_read_counts())


def test_batch_skips_only_what_every_sequence_skips():
    """Four sequences in one step read a group when any of them needs it: more groups
    than one sequence alone, and results equal to one at a time."""
    model = open_model(TRAINED)
    states = [model.new_state() for _ in range(4)]
    for i, s in enumerate(states):
        model.prefill(heldout(16, start=100 * i), s)
    alone = [model.forward([65 + i], s.clone()) for i, s in enumerate(states)]
    model._m.set_counting_reads(True)
    together = model.forward_batch([[65 + i] for i in range(4)], states)
    model._m.set_counting_reads(False)
    np.testing.assert_allclose(together, np.array(alone), atol=1e-4, rtol=0)
    counts = model._m.take_read_counts()
    read, groups = sum(c[0] for c in counts), sum(c[1] for c in counts)
    model._m.set_counting_reads(True)
    model.forward([65], states[0].clone())
    model._m.set_counting_reads(False)
    alone_read = sum(c[0] for c in model._m.take_read_counts())
    assert alone_read < read <= groups


def saved_metadata(path):
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return json.loads(path.read_bytes()[8:8 + n])["__metadata__"]


@pytest.mark.parametrize("dtype", ["int8", "nf4"])
def test_saved_quantized_models_keep_their_layout(tmp_path, monkeypatch, dtype):
    """A saved quantized value projection is written as stored, its layout in the
    metadata; a file without it (saved dense) loads dense, whatever the default."""
    sparse = open_model(TINY, dtype=dtype)
    sparse.save(tmp_path / "sparse.safetensors")
    assert saved_metadata(tmp_path / "sparse.safetensors")["layout.blocks.0.ffn.value.weight"] == "input-major"
    monkeypatch.setenv("RWKV_GPU_NO_SPARSE_FFN", "1")
    dense = open_model(TINY, dtype=dtype)
    dense.save(tmp_path / "dense.safetensors")
    assert "layout.blocks.0.ffn.value.weight" not in saved_metadata(tmp_path / "dense.safetensors")
    monkeypatch.delenv("RWKV_GPU_NO_SPARSE_FFN")
    prompt = heldout(20)
    for path, original in [("sparse.safetensors", sparse), ("dense.safetensors", dense)]:
        again = open_model(tmp_path / path)
        assert again._m.ffn_value_storage() == original._m.ffn_value_storage()
        np.testing.assert_array_equal(again.forward(prompt, again.new_state(), all_logits=True),
                                      original.forward(prompt, original.new_state(), all_logits=True))


def test_a_saved_layout_this_version_does_not_know_is_refused(tmp_path):
    model = open_model(TINY, dtype="int8")
    path = tmp_path / "m.safetensors"
    model.save(path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].replace(b'"input-major"', b'"diagonal-xx"')  # same length
    path.write_bytes(raw[:8] + header + raw[8 + n:])
    with pytest.raises(ModelLoadError, match="layout.*diagonal"):
        open_model(path)
