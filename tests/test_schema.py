"""Checkpoints held against the schema before anything is allocated: wrong shapes,
unknown or missing tensors, non-finite weights, headers and views that claim more than
any model has, and files of other kinds, each a ModelLoadError that names the problem;
the process survives every one and a model already open keeps giving its results."""

from __future__ import annotations

import os

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, open_model
from support.pth_writer import write_pth
from support.safetensors_writer import header_bytes, read_raw, write_safetensors

TINY = DATA / "tiny-rwkv7" / "model.safetensors"


@pytest.fixture(scope="module")
def raw():
    """The tiny model's tensors, bf16 as uint16 bits (rewrites are bit-exact)."""
    return read_raw(TINY)


def load_error(tmp_path, tensors, name="m.safetensors"):
    path = tmp_path / name
    write_safetensors(path, tensors)
    with pytest.raises(rwkv_gpu.ModelLoadError) as info:
        open_model(path)
    return str(info.value)


@pytest.mark.parametrize("name, change, expected", [
    ("blocks.1.ffn.key.weight", lambda a: a.T.copy(), r"blocks.1.ffn.key.weight has shape [128, 512]; expected [512, 128]"),
    ("blocks.1.ffn.value.weight", lambda a: a.T.copy(), r"blocks.1.ffn.value.weight has shape [512, 128]; expected [128, 512]"),
    ("head.weight", lambda a: a.T.copy(), r"head.weight has shape [128, 512]; expected [512, 128]"),
    ("blocks.1.att.output.weight", lambda a: a.reshape(-1), r"blocks.1.att.output.weight has shape [16384]; expected [128, 128]"),
    ("blocks.0.att.key.weight", lambda a: a.reshape(2, 64, 2, 64), r"blocks.0.att.key.weight has shape [2, 64, 2, 64]"),
    ("blocks.1.att.k_k", lambda a: a.reshape(128, 1, 1), r"blocks.1.att.k_k has shape [128, 1, 1]; expected [1, 1, 128]"),
])
def test_wrong_shape_with_the_right_element_count_is_refused(tmp_path, raw, name, change, expected):
    tensors = dict(raw)
    tensors[name] = change(raw[name])
    assert expected in load_error(tmp_path, tensors)


def test_a_1x1xC_vector_may_be_stored_flat(tmp_path, raw, tiny_cases):
    tensors = {n: (a.reshape(-1) if a.shape[:2] == (1, 1) else a) for n, a in raw.items()}
    write_safetensors(tmp_path / "flat.safetensors", tensors)
    flat, official = open_model(tmp_path / "flat.safetensors"), open_model(TINY)
    tokens = tiny_cases["prompt"][:6]
    np.testing.assert_array_equal(flat.forward(tokens, flat.new_state()), official.forward(tokens, official.new_state()))


def test_every_problem_in_one_error(tmp_path, raw):
    tensors = dict(raw)
    tensors["blocks.1.ffn.key.weight"] = raw["blocks.1.ffn.key.weight"].T.copy()
    del tensors["blocks.0.att.g2"]
    tensors["blocks.1.att.extra"] = raw["blocks.1.att.k_k"]
    msg = load_error(tmp_path, tensors)
    assert "3 problems" in msg
    for part in ["blocks.1.ffn.key.weight has shape", "missing tensor blocks.0.att.g2", "unexpected tensor blocks.1.att.extra"]:
        assert part in msg, msg


def test_wrong_dtype_is_refused(tmp_path, raw):
    tensors = dict(raw)
    tensors["blocks.0.ln1.weight"] = np.zeros(128, np.int8)
    assert "blocks.0.ln1.weight has dtype I8" in load_error(tmp_path, tensors)


@pytest.mark.parametrize("name, index, value", [
    ("blocks.1.att.key.weight", (3, 5), np.nan),
    ("blocks.0.ln2.bias", (7,), np.inf),
    ("emb.weight", (300, 2), -np.inf),
    ("head.weight", (511, 127), np.nan),
])
def test_non_finite_weight_names_tensor_and_index(tmp_path, raw, name, index, value):
    tensors = dict(raw)
    a = (raw[name].astype(np.uint32) << 16).view(np.float32).copy()  # bf16 -> f32, exact
    a[index] = value
    tensors[name] = a
    msg = load_error(tmp_path, tensors)
    shown = "NaN" if np.isnan(value) else str(value)  # as Rust prints an f32
    assert f"{name} holds {shown}" in msg, msg
    assert f"at index {list(index)}" in msg, msg


@pytest.mark.parametrize("stray, expected", [
    ("blocks.99999999999.att.k_k", "beyond the 1024 layers"),
    ("blocks.100000.att.k_k", "beyond the 1024 layers"),
    ("blocks.5.att.k_k", "layers 2, 3, 4 are missing"),
    ("blocks.x.att.k_k", "layer index \"x\" is not a number"),
])
def test_stray_layer_index_is_refused_before_any_allocation(tmp_path, raw, stray, expected):
    tensors = dict(raw)
    tensors[stray] = raw["blocks.1.att.k_k"]
    assert expected in load_error(tmp_path, tensors)


def test_header_claiming_a_huge_vocabulary_is_refused(tmp_path, raw):
    """A consistent header over a sparse file: emb and head claim 2^23 x 128 values
    (4 GiB of zeros that take no disk). Refused by the schema's bounds, not attempted."""
    rows = 1 << 23
    entries, blobs = {}, {}
    for name, a in raw.items():
        if name in ("emb.weight", "head.weight"):
            entries[name] = ("BF16", [rows, 128], rows * 128 * 2)
        else:
            blobs[name] = a.tobytes()
            entries[name] = ("BF16", list(a.shape), len(blobs[name]))
    # Big tensors last, so that the stored bytes come first and the rest is a hole.
    order = [n for n in entries if n in blobs] + ["emb.weight", "head.weight"]
    head = header_bytes({n: entries[n] for n in order})
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(head + b"".join(blobs[n] for n in order if n in blobs))
        f.truncate(len(head) + sum(entries[n][2] for n in order))
    with pytest.raises(rwkv_gpu.ModelLoadError, match=r"beyond the bounds this library accepts"):
        open_model(path)


def test_pth_view_with_stride_zero_claiming_terabytes_is_refused(tmp_path, raw):
    tensors = {n: (a, "bf16") for n, a in raw.items()}
    tensors["emb.weight"] = (raw["emb.weight"][0], "bf16")
    path = tmp_path / "expand.pth"
    write_pth(path, tensors, expand={"emb.weight": 8 * 10**9})  # 8e9 x 128 bf16: 2 TB
    assert os.path.getsize(path) < 2 << 20
    with pytest.raises(rwkv_gpu.ModelLoadError, match=r"emb.weight.*overlapping views are not weights"):
        open_model(path)


def fake(names):
    return {n: np.zeros(8, np.float16) for n in names}


@pytest.mark.parametrize("names, expected", [
    (["blocks.0.att.time_maa_x", "blocks.0.att.time_faaaa", "emb.weight"], "an RWKV-6 checkpoint"),
    (["blocks.0.att.time_first", "blocks.0.att.time_decay", "blocks.0.att.time_mix_k"], "an RWKV-4 checkpoint"),
    (["blocks.0.att.time_first", "blocks.0.att.ln_x.weight"], "an RWKV-5 checkpoint"),
    (["blocks.0.att.qkv.weight", "blocks.0.att.r_k", "emb.weight"], "an RWKV-7b (DEA) checkpoint"),
    (["base_model.model.blocks.0.att.key.lora_A.weight"], "a LoRA adapter"),
    (["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"], "a transformer checkpoint"),
    ([], "an empty checkpoint"),
])
def test_other_kinds_of_file_are_named(tmp_path, names, expected):
    msg = load_error(tmp_path, fake(names))
    assert "not an RWKV-7 checkpoint" in msg and expected in msg, msg


def test_gguf_is_named(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(rwkv_gpu.ModelLoadError, match="a GGUF file"):
        open_model(path)


def test_failed_loads_leave_an_open_model_as_it_was(tmp_path, raw, tiny_cases):
    model = open_model(TINY)
    before = model.forward(tiny_cases["prompt"][:5], model.new_state())
    tensors = dict(raw)
    tensors["head.weight"] = raw["head.weight"].T.copy()
    load_error(tmp_path, tensors)
    load_error(tmp_path, fake(["blocks.0.att.time_first"]), "b.safetensors")
    np.testing.assert_array_equal(model.forward(tiny_cases["prompt"][:5], model.new_state()), before)
