"""State-tuning files (blocks.{i}.att.time_state) and embeddings, against the float64
NumPy reference on the tiny golden model (2 layers, 128 wide, 2 heads of 64)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA
from support import reference
from support.pth_writer import write_pth

TINY = DATA / "tiny-rwkv7"
L, C, H, N = 2, 128, 2, 64
# GPU (fp16 weights, f32 math) against the float64 reference on bf16-exact weights: the
# golden tests measure ~5e-6 on logits; 1e-3 is the project-wide bound for whole forwards.
TOL = 1e-3


@pytest.fixture(scope="module")
def weights():
    return reference.load_safetensors(TINY / "model.safetensors")


def rank_one_states(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer and head, S = v k^T; returns (S [L,H,N,N], v [L,H,N], k [L,H,N])."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((L, H, N)).astype(np.float32)
    k = rng.standard_normal((L, H, N)).astype(np.float32) / 8
    return np.einsum("lhi,lhj->lhij", v, k), v, k


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, rounded to nearest even (as torch's .bfloat16())."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_state_tuning(path, states, dtype="f32", leading_one=False):
    tensors = {}
    for i in range(L):
        s = states[i][None] if leading_one else states[i]
        tensors[f"blocks.{i}.att.time_state"] = (bf16_bits(s) if dtype == "bf16" else s, dtype)
    write_pth(path, tensors)


def test_reference_reads_a_rank_one_state_as_v_times_k_dot_r():
    """The convention the GPU is checked against: the state is [value, key] and the
    output is S r, so S = v k^T gives v (k . r). (No decay, no new token: w=1, k=v=0.)"""
    _, v, k = rank_one_states(1)
    v, k = v[0, 0].astype(np.float64), k[0, 0].astype(np.float64)
    S = np.outer(v, k)
    r = np.random.default_rng(2).standard_normal(N)
    zero = np.zeros(N)
    S_new, y = reference.wkv7_step(S, r, np.ones(N), zero, zero, zero, zero)
    np.testing.assert_allclose(S_new, S)
    np.testing.assert_allclose(y, v * (k @ r), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transpose", [False, True])
def test_state_tuning_file_loads_as_is_or_transposed(tmp_path, tiny_model, weights, transpose):
    states, _, _ = rank_one_states(3)
    stored = np.swapaxes(states, -1, -2) if transpose else states  # a [head, key, value] file
    path = tmp_path / "tuned.pth"
    write_state_tuning(path, stored)
    state = tiny_model.load_state(path, transpose=transpose)
    host = state.to_numpy()
    np.testing.assert_array_equal(host["wkv"], states)
    assert not host["att_shift"].any() and not host["ffn_shift"].any()
    # Going on from it: the same logits as the reference from the hand-built state.
    tokens = [5, 77, 300]
    got = tiny_model.forward(tokens, state, all_logits=True)
    ref_state = {"att_shift": np.zeros((L, C)), "wkv": states.astype(np.float64), "ffn_shift": np.zeros((L, C))}
    want = reference.forward(weights, tokens, ref_state)
    assert reference.maxdev(got, want) < TOL


def test_state_tuning_file_variants_and_errors(tmp_path, tiny_model):
    states, _, _ = rank_one_states(4)
    # bf16 storage and a leading batch dimension of 1 both load.
    path = tmp_path / "bf16.pth"
    write_state_tuning(path, states, dtype="bf16", leading_one=True)
    got = tiny_model.load_state(path).to_numpy()["wkv"]
    np.testing.assert_array_equal(got, (bf16_bits(states).astype(np.uint32) << 16).view(np.float32))
    # Wrong head size, missing layer, extra layer.
    bad = tmp_path / "bad.pth"
    write_pth(bad, {f"blocks.{i}.att.time_state": np.zeros((H, 32, 32), np.float32) for i in range(L)})
    with pytest.raises(rwkv_gpu.StateError, match=r"shape \[2, 32, 32\]"):
        tiny_model.load_state(bad)
    write_pth(bad, {"blocks.0.att.time_state": states[0]})
    with pytest.raises(rwkv_gpu.StateError, match="no blocks.1.att.time_state"):
        tiny_model.load_state(bad)
    # Any tensor besides this model's layers' time_state: the file is some other model's
    # (a layer past ours, even with a gap) or not a state-tuning file (a saved state's
    # tensors beside them, a layer spelled another way).
    for extra in ["blocks.2.att.time_state", "blocks.5.att.time_state", "att_shift", "blocks.01.att.time_state"]:
        write_pth(bad, {**{f"blocks.{i}.att.time_state": states[0] for i in range(L)}, extra: states[0]})
        only = re.escape(f"a state-tuning file for this model has only blocks.0..{L - 1}.att.time_state")
        with pytest.raises(rwkv_gpu.StateError, match=rf"holds {re.escape(extra)}; {only}"):
            tiny_model.load_state(bad)
    own = tmp_path / "own.st"
    tiny_model.new_state().save(own)
    with pytest.raises(rwkv_gpu.RwkvError, match="transpose applies to state-tuning files"):
        tiny_model.load_state(own, transpose=True)


def test_initial_state_from_a_state_tuning_file(tmp_path):
    from conftest import open_model

    states, _, _ = rank_one_states(5)
    path = tmp_path / "tuned.pth"
    write_state_tuning(path, states)
    m = open_model(TINY / "model.safetensors", initial_state=path)
    np.testing.assert_array_equal(m.new_state().to_numpy()["wkv"], states)
    a = m.forward([1, 2, 3], m.new_state())
    b = m.forward([1, 2, 3], m.load_state(path))
    np.testing.assert_array_equal(a, b)


# ---- embeddings ----

def test_embed_is_the_reference_hidden_state(tiny_model, weights, tiny_cases):
    prompt = [int(t) for t in tiny_cases["prompt"]]
    hidden = reference.forward(weights, prompt, reference.new_state(weights), hidden=True)
    last = tiny_model.embed(prompt)
    assert last.dtype == np.float32 and last.shape == (C,)
    assert reference.maxdev(last, hidden[-1]) < TOL
    mean = tiny_model.embed(prompt, pooling="mean")
    assert reference.maxdev(mean, hidden.mean(0)) < TOL


def test_embed_of_texts_longer_than_a_chunk(tiny_model, weights):
    """Each text is fed a chunk at a time, one forward call each (the model is let go in
    between): its state carries over, the mean runs over every chunk's rows, and texts
    that end in different chunks each keep their own last row."""
    chunk = tiny_model.config["chunk_tokens"]
    long = [int(t) for t in np.random.default_rng(3).integers(1, 512, 2 * chunk + 5)]
    hidden = reference.forward(weights, long, reference.new_state(weights), hidden=True)
    assert reference.maxdev(tiny_model.embed(long), hidden[-1]) < TOL
    assert reference.maxdev(tiny_model.embed(long, pooling="mean"), hidden.mean(0)) < TOL
    # The last forward call fed the last 5 tokens alone: one submission (a single call
    # over the whole text would have made three).
    assert tiny_model._m.last_stats()[0] == 1
    texts = [long, long[:chunk + 1], long[:7]]
    for pooling in ("last", "mean"):
        together = tiny_model.embed(texts, pooling=pooling)
        for row, text in zip(together, texts):
            np.testing.assert_allclose(row, tiny_model.embed(text, pooling=pooling), atol=1e-5, rtol=0)


def test_embed_batches_and_repeats(tiny_model):
    seqs = [[1, 2, 3], [400, 5], list(range(10, 60))]
    batch = tiny_model.embed(seqs, pooling="mean")
    assert batch.shape == (3, C)
    # The texts share passes over the weights, where a short one may go through the tiled
    # matmul instead of matvec: float rounding apart (~1e-7 on O(1) values), not bits.
    for row, seq in zip(batch, seqs):
        np.testing.assert_allclose(row, tiny_model.embed(seq, pooling="mean"), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(batch, tiny_model.embed(seqs, pooling="mean"))  # the same call: the same bits
    np.testing.assert_array_equal(tiny_model.embed(np.array([1, 2, 3])), tiny_model.embed([1, 2, 3]))


def test_embed_rejects_bad_input(tiny_model):
    with pytest.raises(rwkv_gpu.RwkvError, match="pooling"):
        tiny_model.embed([1, 2], pooling="max")
    with pytest.raises(rwkv_gpu.ShapeError):
        tiny_model.embed([])
    with pytest.raises(rwkv_gpu.ShapeError, match="out of range"):
        tiny_model.embed([[1, 2], [9999]])
    # Every bad id is named by its text, whether the vocabulary or a u32 refuses it.
    for bad in (9999, -1, 2**40):
        with pytest.raises(rwkv_gpu.ShapeError, match=f"^text 1: token id {bad} at position 1 is out of range"):
            tiny_model.embed([[1, 2], [3, bad]])
        with pytest.raises(rwkv_gpu.ShapeError, match=f"^sequence 1: token id {bad} at position 1 is out of range"):
            tiny_model.forward_batch([[1, 2], [3, bad]], tiny_model.new_states(2))


def test_state_tuning_file_of_a_one_head_model_and_of_codes(tmp_path):
    """A one-head model's time_state is [1, N, N] (with or without a leading batch 1):
    its own 1 is not a batch dimension. Integer tensors are not states."""
    from support.safetensors_writer import write_safetensors

    model = rwkv_gpu.Model.random(2, 64, vocab_size=100)  # head size 64: one head
    states = np.random.default_rng(5).standard_normal((2, 1, 64, 64)).astype(np.float32)
    for leading in ((), (1,)):
        path = tmp_path / f"one-head{len(leading)}.pth"
        write_pth(path, {f"blocks.{i}.att.time_state": states[i].reshape(leading + states[i].shape) for i in range(2)})
        np.testing.assert_array_equal(model.load_state(path).to_numpy()["wkv"], states)
    codes = tmp_path / "codes.safetensors"
    write_safetensors(codes, {f"blocks.{i}.att.time_state": np.ones((1, 64, 64), np.int8) for i in range(2)})
    with pytest.raises(rwkv_gpu.StateError, match=r"blocks\.0\.att\.time_state is I8; a state is floating point"):
        model.load_state(codes)


def test_a_state_with_nan_or_infinity_is_refused(tmp_path, tiny_model):
    """From arrays, or from a file (which the error names)."""
    good = tiny_model.new_state().to_numpy()
    for part, value in (("wkv", np.nan), ("att_shift", np.inf)):
        arrays = {k: v.copy() for k, v in good.items()}
        arrays[part].reshape(-1)[7] = value
        with pytest.raises(rwkv_gpu.ShapeError, match="state holds NaN or infinite values"):
            tiny_model.state_from_numpy(arrays)
    states, _, _ = rank_one_states(4)
    states[1, 0, 3, 3] = np.inf
    path = tmp_path / "inf.pth"
    write_state_tuning(path, states)
    with pytest.raises(rwkv_gpu.ShapeError, match=r"inf\.pth: state holds NaN or infinite values"):
        tiny_model.load_state(path)
