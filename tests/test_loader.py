"""Checkpoint variants that must load to the same model: web-rwkv's fp16 layout with
transposed low-rank matrices, fp32 files, .pth with shared storages and odd prefixes,
and bf16 values beyond the fp16 range. The zip/pickle cases themselves are unit-tested
in Rust (src/loader/pth.rs)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA, open_model
from support import reference
from support.pth_writer import write_pth
from support.safetensors_writer import write_safetensors

LOW_RANK = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


@pytest.fixture(scope="module")
def tiny_weights():
    return reference.load_safetensors(DATA / "tiny-rwkv7" / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_expected(tiny_cases):
    model = open_model(DATA / "tiny-rwkv7" / "model.safetensors")
    return model.forward(tiny_cases["prompt"][:12], model.new_state(), all_logits=True)


def logits_of(path, cases):
    model = open_model(path)
    return model.forward(cases["prompt"][:12], model.new_state(), all_logits=True)


def test_web_rwkv_layout_fp16_transposed(tmp_path, tiny_weights, tiny_cases, tiny_expected):
    converted = {}
    for name, a in tiny_weights.items():
        if name.split(".")[-1] in LOW_RANK:
            a = a.T
        converted[name] = a.astype(np.float16)
    write_safetensors(tmp_path / "web.st", converted)
    # bf16 -> fp16 is exact for these weights, so the logits are identical.
    np.testing.assert_array_equal(logits_of(tmp_path / "web.st", tiny_cases), tiny_expected)


def test_fp32_safetensors(tmp_path, tiny_weights, tiny_cases, tiny_expected):
    write_safetensors(tmp_path / "f32.safetensors", {k: v.astype(np.float32) for k, v in tiny_weights.items()})
    np.testing.assert_array_equal(logits_of(tmp_path / "f32.safetensors", tiny_cases), tiny_expected)


@pytest.mark.parametrize("options", [{"prefix": "rwkv7-g1-0.1b-20250307", "zip64": True}, {"share_storage": True, "transpose": set()}])
def test_pth_variants(tmp_path, tiny_weights, tiny_cases, tiny_expected, options):
    bf16 = {k: ((v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16), "bf16") for k, v in tiny_weights.items()}
    if "transpose" in options:
        options = {**options, "transpose": {k for k in tiny_weights if k.endswith(("key.weight", "w1"))}}
    write_pth(tmp_path / "m.pth", bf16, **options)
    np.testing.assert_array_equal(logits_of(tmp_path / "m.pth", tiny_cases), tiny_expected)


def test_bf16_beyond_fp16_range_stays_finite(tmp_path, tiny_weights, tiny_cases):
    """A matrix with a value of 1e5 (beyond fp16's 65504) is kept as bf16, not turned into
    inf: the logits stay finite and match the float64 reference on the same weights."""
    weights = dict(tiny_weights)
    big = weights["blocks.1.ffn.value.weight"].copy()
    big[0, 0] = 1.0e5
    weights["blocks.1.ffn.value.weight"] = big
    bits = {k: (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for k, v in weights.items()}
    write_safetensors(tmp_path / "big.safetensors", bits)
    got = logits_of(tmp_path / "big.safetensors", tiny_cases)
    assert np.isfinite(got).all()
    exact = {k: (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64) for k, b in bits.items()}
    want = reference.forward(exact, tiny_cases["prompt"][:12], reference.new_state(exact))
    # The outlier makes the residual large; compare relative to the logit scale.
    np.testing.assert_allclose(got, want, atol=1e-3 * max(1.0, np.abs(want).max()), rtol=0)
