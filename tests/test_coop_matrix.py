"""The prefill kernel on cooperative matrices (shaders/matmul_coop.wgsl) and the check at
load that turns it on (src/model/coop_check.rs).

Lavapipe has no matrix units, so here the kernel runs emulated (RWKV_GPU_COOP_EMULATE=1:
its staging, tiling and stores as on a GPU, the 16x16 matrix operations done by the
subgroup's lanes); tests/test_kernels.py checks it against NumPy kernel by kernel, these
check the whole model and the choice.

Tolerance against the official outputs: the kernel multiplies f16 operands (inputs
rounded to f16: 2^-11 relative each), so a product's outputs move by ~5e-4 of their size
(the check at load measures 2e-4) and logits of up to ~17 by a few 1e-3 (measured: tiny
4.8e-3, trained 2.3e-3); 2e-2 leaves 4x headroom, while a kernel that drops a tile or
reads a block transposed moves logits by whole units.
"""
from __future__ import annotations

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, open_model

COOP_TOL = 2e-2
CHECK_TOLERANCE = 1e-2  # coop_check.rs TOLERANCE


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv("RWKV_GPU_COOP_EMULATE", "1")
    monkeypatch.delenv("RWKV_GPU_NO_COOP_MATRIX", raising=False)


def device_has_matrix_units():
    return any(a["cooperative_matrices"] for a in rwkv_gpu.adapters())


def emulation_refused():
    """Why the load refuses the emulated kernel for the adapter's subgroup sizes (the
    kernel compiles for subgroups of at least 8 lanes; lavapipe's are 4 with 128-bit
    vectors, LP_NATIVE_VECTOR_WIDTH=128, as on some mobile GPUs), or None. Called with
    the emulation on; any other refusal is left for the tests to fail on."""
    model = open_model(DATA / "tiny-rwkv7" / "model.safetensors")
    note = model.config["matmul_kernel_note"]
    model.close()
    return note if "no kernel for subgroups" in note else None


@pytest.fixture(params=["emulated", "device"])
def coop(request, monkeypatch):
    """The kernel emulated (everywhere with f16 and fixed-size subgroups of 8 or more
    lanes), or on the device's matrix units (GPU sessions only)."""
    monkeypatch.delenv("RWKV_GPU_NO_COOP_MATRIX", raising=False)  # conftest's
    if request.param == "emulated":
        monkeypatch.setenv("RWKV_GPU_COOP_EMULATE", "1")
        refused = emulation_refused()
        if refused:
            # Only a width under the kernel's narrowest may be refused: at 8 lanes (CI's
            # lavapipe) and wider, a refusal is a failure, not a skip.
            narrowest = min(a["subgroup_sizes"][0] for a in rwkv_gpu.adapters() if a["subgroups"])
            assert narrowest < 8, refused
            pytest.skip(f"the emulated kernel does not run here: {refused}")
    elif not device_has_matrix_units():
        pytest.skip("no adapter here has cooperative matrices (16x16x16 f16, f32 sums)")
    return request.param


def test_the_default_kernel_and_why(monkeypatch):
    """Without matrix units (lavapipe): SIMT, saying why; with them: the checked kernel."""
    monkeypatch.delenv("RWKV_GPU_NO_COOP_MATRIX")  # conftest turns it off for the rest
    model = open_model(DATA / "tiny-rwkv7" / "model.safetensors")
    c = model.config
    assert model._m.matmul_disagreement("simt") == 0.0  # the same kernel twice: bit-identical
    with pytest.raises(ValueError, match="simt"):
        model._m.matmul_disagreement("tensor")
    if device_has_matrix_units():
        assert c["matmul_kernel"] == "coop_matrix", c["matmul_kernel_note"]
        assert 0.0 < model._m.matmul_disagreement("coop_matrix") <= CHECK_TOLERANCE
    else:
        assert c["matmul_kernel"] == "simt"
        assert "not offered" in c["matmul_kernel_note"], c["matmul_kernel_note"]
        with pytest.raises(rwkv_gpu.DeviceError, match="cooperative matrices"):
            model._m.matmul_disagreement("coop_matrix")
    model.close()


def test_turned_off_wins_over_emulation(emulated, monkeypatch):
    monkeypatch.setenv("RWKV_GPU_NO_COOP_MATRIX", "1")
    model = open_model(DATA / "tiny-rwkv7" / "model.safetensors")
    assert model.config["matmul_kernel"] == "simt"
    assert "RWKV_GPU_NO_COOP_MATRIX" in model.config["matmul_kernel_note"]
    model.close()


def coop_kernels_run(model, tokens):
    """The kernel labels of one profiled prefill of `tokens`."""
    model._m.set_profiling(True)
    model.forward(tokens, model.new_state())
    labels = {name for name, _, _ in model._m.last_profile()}
    model._m.set_profiling(False)
    return labels


@pytest.mark.parametrize("name, cases_key, tokens_key", [
    ("tiny-rwkv7", "prompt_logits", "prompt"),
    ("trained-bytes", "logits", "tokens"),
])
def test_kernel_passes_the_check_and_matches_official(coop, name, cases_key, tokens_key):
    cases = np.load(DATA / name / "cases.npz")
    model = open_model(DATA / name / "model.safetensors")
    c = model.config
    assert c["matmul_kernel"] == "coop_matrix", c["matmul_kernel_note"]
    assert ("emulated" in c["matmul_kernel_note"]) == (coop == "emulated")
    # Not the SIMT kernel under another name (f16 operands differ), and within the check.
    assert 0.0 < model._m.matmul_disagreement("coop_matrix") <= CHECK_TOLERANCE
    logits = model.forward(cases[tokens_key], model.new_state(), all_logits=True)
    np.testing.assert_allclose(logits, cases[cases_key], atol=COOP_TOL, rtol=0)
    again = model.forward(cases[tokens_key], model.new_state(), all_logits=True)
    assert np.array_equal(logits, again)  # fixed summation order: bit-identical run to run
    labels = coop_kernels_run(model, cases[tokens_key])
    assert any(label.startswith("matmul_coop") for label in labels), labels
    assert not any(label.startswith("matmul_tiled") for label in labels), labels
    model.close()


@pytest.mark.parametrize("dtype", ["int8", "nf4"])
def test_kernel_on_quantized_layers_matches_simt(coop, monkeypatch, dtype):
    """Quantized weights are dequantized to f16 in the tile: the same model's SIMT
    prefill (loaded without the kernel) within COOP_TOL; 300 tokens: a full chunk of 256
    and a partial one (chunks of 256 on GPUs too)."""
    monkeypatch.setenv("RWKV_GPU_CHUNK_TOKENS", "256")
    path = DATA / "trained-bytes" / "model.safetensors"
    tokens = np.load(DATA / "trained-bytes" / "cases.npz")["tokens"]
    tokens = np.concatenate([tokens, tokens[:44]])
    coop_model = open_model(path, layer_dtypes=[dtype])
    assert coop_model.config["matmul_kernel"] == "coop_matrix"
    got = coop_model.forward(tokens, coop_model.new_state(), all_logits=True)
    coop_model.close()
    monkeypatch.delenv("RWKV_GPU_COOP_EMULATE", raising=False)
    monkeypatch.setenv("RWKV_GPU_NO_COOP_MATRIX", "1")
    simt = open_model(path, layer_dtypes=[dtype])
    assert simt.config["matmul_kernel"] == "simt"
    want = simt.forward(tokens, simt.new_state(), all_logits=True)
    simt.close()
    np.testing.assert_allclose(got, want, atol=COOP_TOL, rtol=0)
