"""RWKV-7a DeepEmbed against the official package's outputs (`deepembed-rwkv7a`, made with
RWKV_DE_VERSION=1): every prompt position, every step and both states, from .pth and
.safetensors, under the fallback switches, in chunks, in a ragged batch, through saved
states and a saved model; int8 / nf4 projections against the float64 reference with the
same dequantized weights. Tolerances as the plain golden tests (test_golden.py): 1e-3
against official f32 outputs (we hold weights as fp16 where the file has bf16, exactly
representable here, and sum in a different order); 1e-4 between two of our own runs that
differ only in how the work is split."""

from __future__ import annotations

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, FALLBACKS, open_model
from support import reference
from support.safetensors_writer import read_raw, write_safetensors
from test_quant import dequantized_weights

HERE = DATA / "deepembed-rwkv7a"
TOL = 1e-3
TOL_SELF = 1e-4
STATES = ("att_shift", "wkv", "ffn_shift")


@pytest.fixture(scope="module")
def cases():
    return np.load(HERE / "cases.npz")


def check_golden(model, c, prompt_logits=None):
    state = model.new_state()
    logits = model.forward(c["prompt"], state, all_logits=True) if prompt_logits is None else prompt_logits(state)
    np.testing.assert_allclose(logits, c["prompt_logits"], atol=TOL, rtol=0)
    got = state.to_numpy()
    for name in STATES:
        np.testing.assert_allclose(got[name], c[f"prefill_{name}"], atol=TOL, rtol=0, err_msg=name)
    for i, token in enumerate(c["step_tokens"]):
        step = model.forward([int(token)], state)
        np.testing.assert_allclose(step, c["step_logits"][i], atol=TOL, rtol=0, err_msg=f"step {i}")
    got = state.to_numpy()
    for name in STATES:
        np.testing.assert_allclose(got[name], c[f"final_{name}"], atol=TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("fallback", FALLBACKS)
@pytest.mark.parametrize("file", ["model.safetensors", "model.pth"])
def test_golden(file, fallback, cases):
    model = open_model(HERE / file, **FALLBACKS[fallback])
    assert model.config["deep_embed_rank"] == 32
    check_golden(model, cases)


def test_prefill_in_chunks_equals_the_golden_positions(cases):
    model = open_model(HERE / "model.safetensors")

    def in_pieces(state):
        prompt = [int(t) for t in cases["prompt"]]
        parts = [prompt[:1], prompt[1:6], prompt[6:23], prompt[23:]]
        return np.concatenate([model.forward(p, state, all_logits=True) for p in parts])

    check_golden(model, cases, in_pieces)


def test_ragged_batch_equals_one_at_a_time(cases):
    model = open_model(HERE / "model.safetensors")
    prompt = [int(t) for t in cases["prompt"]]
    seqs = [prompt, prompt[:5], prompt[7:30], [int(t) for t in cases["step_tokens"]]]
    together = model.forward_batch(seqs, model.new_states(len(seqs)), all_logits=True)
    for i, (tokens, got) in enumerate(zip(seqs, together)):
        alone = model.forward(tokens, model.new_state(), all_logits=True)
        np.testing.assert_allclose(got, alone, atol=TOL_SELF, rtol=0, err_msg=f"sequence {i}")
    np.testing.assert_allclose(together[0], cases["prompt_logits"], atol=TOL, rtol=0)


def test_saved_state_continues_as_the_official_steps(tmp_path, cases):
    model = open_model(HERE / "model.pth")
    state = model.new_state()
    model.prefill(cases["prompt"], state)
    state.save(tmp_path / "after-prompt.state")
    other = open_model(HERE / "model.safetensors")  # the same weights from the other file
    again = other.load_state(tmp_path / "after-prompt.state")
    for i, token in enumerate(cases["step_tokens"]):
        step = other.forward([int(token)], again)
        np.testing.assert_allclose(step, cases["step_logits"][i], atol=TOL, rtol=0, err_msg=f"step {i}")


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantized_projections_equal_the_reference_with_the_same_weights(fmt, cases):
    model = open_model(HERE / "model.safetensors", dtype=fmt)
    formats = model.weight_formats()
    assert formats["blocks.1.ffn.key"] == fmt and formats["blocks.1.att.w1"] == "fp16"
    weights = reference.load_safetensors(HERE / "model.safetensors")
    prompt = [int(t) for t in cases["prompt"]]
    got = model.forward(prompt, model.new_state(), all_logits=True)
    want = reference.forward(dequantized_weights(weights, fmt, range(2)), prompt, reference.new_state(weights))
    assert reference.maxdev(got, want) < TOL
    # The host tables are not quantized: still exactly the file's bytes.
    assert model.host_memory()["deep_embed"] == 2 * 512 * 1024 * 2


@pytest.mark.parametrize("dtype", [None, "int8"])
def test_saved_model_round_trips(tmp_path, cases, dtype):
    model = open_model(HERE / "model.safetensors", dtype=dtype)
    model.save(tmp_path / "saved.safetensors")
    saved = read_raw(tmp_path / "saved.safetensors")
    for i in (0, 1):
        for part in ("s_emb.weight", "s_emb_x.weight", "s0", "s1", "s2"):
            assert f"blocks.{i}.ffn.{part}" in saved
    official = read_raw(HERE / "model.safetensors")
    assert saved["blocks.1.ffn.s_emb.weight"].tobytes() == official["blocks.1.ffn.s_emb.weight"].tobytes()
    assert saved["blocks.1.ffn.s2"].shape == (32, 512) and saved["blocks.1.ffn.s1"].shape == (128, 32)
    again = open_model(tmp_path / "saved.safetensors")
    tokens = cases["prompt"][:9]
    np.testing.assert_array_equal(again.forward(tokens, again.new_state(), all_logits=True),
                                  model.forward(tokens, model.new_state(), all_logits=True))


def test_host_tables_are_reported_and_mapped():
    model = open_model(HERE / "model.safetensors")
    host = model.host_memory()
    assert host == {"embeddings": 512 * 128 * 2, "deep_embed": 2 * 512 * 1024 * 2, "mapped": 512 * 128 * 2 + 2 * 512 * 1024 * 2}
    # The tables take no device memory.
    assert model.memory()["embeddings"] == 0
    plain = open_model(DATA / "tiny-rwkv7" / "model.safetensors")
    assert plain.host_memory()["deep_embed"] == 0 and plain.config["deep_embed_rank"] == 0


@pytest.mark.parametrize("change, says", [
    (lambda t: t.pop("blocks.1.ffn.s2"), "missing tensor blocks.1.ffn.s2"),
    (lambda t: t.update({"blocks.0.ffn.s_emb.weight": t["blocks.0.ffn.s_emb.weight"][:, :512].copy()}),
     "blocks.0.ffn.s_emb.weight has shape [512, 512]; expected [512, 1024]"),
    (lambda t: t.update({"blocks.1.ffn.s_emb_x.weight": t["blocks.1.ffn.s_emb_x.weight"].T.copy()}),
     "blocks.1.ffn.s_emb_x.weight has shape [128, 1024]; expected [1024, 128]"),
])
def test_damaged_deepembed_file_is_a_clear_error(tmp_path, change, says):
    tensors = read_raw(HERE / "model.safetensors")
    change(tensors)
    write_safetensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(rwkv_gpu.ModelLoadError) as info:
        open_model(tmp_path / "bad.safetensors")
    assert says in str(info.value)
