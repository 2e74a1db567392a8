"""Saved models (`Model.save`): a model written as it sits on the device and loaded back
without quantizing again. The file's codes and scales must be exactly the NumPy
reference's (tests/support/quant_reference.py), and the reloaded model must compute exactly what the
model it was saved from computed."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, open_model
from support import quant_reference as qr
from support import reference

TINY = DATA / "tiny-rwkv7" / "model.safetensors"
PROMPT = [3, 17, 255, 0, 42, 99, 7, 128, 64, 5]
LOW_RANK = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
PROJECTION_SUFFIXES = tuple(f"{p}.weight" for p in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"))


def logits_of(model):
    return model.forward(PROMPT, model.new_state(), all_logits=True)


@pytest.mark.parametrize("options", [
    {"dtype": "int8"},
    {"dtype": "nf4"},
    {"dtype": "fp16"},
    {"layer_dtypes": ["nf4", "int8"], "quant_head": True},
], ids=["int8", "nf4", "fp16", "mixed-int8-head"])
def test_saved_model_computes_exactly_what_it_was_saved_from(tmp_path, options):
    original = open_model(TINY, **options)
    path = tmp_path / "saved.safetensors"
    original.save(path)
    again = open_model(path)  # no dtype: the saved formats
    assert again.weight_formats() == original.weight_formats()
    assert again.memory()["weights_int8"] == original.memory()["weights_int8"]
    assert again.memory()["weights_nf4"] == original.memory()["weights_nf4"]
    assert again.memory()["head"] == original.memory()["head"]
    assert again.dtype == original.dtype
    # Same weights on the device, same kernels: bit-identical logits at every position.
    np.testing.assert_array_equal(logits_of(again), logits_of(original))


def test_saved_model_loads_on_a_device_with_smaller_bindings(tmp_path):
    """Row chunks are cut for the loading device, not the saving one. The ffn value
    projection, saved input-major, is cut into runs of its inputs whose parts add up
    (summed in another order than whole: 1e-4)."""
    original = open_model(TINY, dtype="nf4", quant_head=True)
    original.save(tmp_path / "m.safetensors")
    small = open_model(tmp_path / "m.safetensors", max_binding=65536)
    assert [layout for layout, _ in small._m.ffn_value_storage()] == ["input-major"] * 2
    np.testing.assert_allclose(logits_of(small), logits_of(original), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_saved_codes_and_scales_are_the_reference_format(tmp_path, fmt):
    path = tmp_path / "m.safetensors"
    open_model(TINY, dtype=fmt).save(path)
    saved = reference.load_safetensors(path)
    meta = reference.safetensors_metadata(path)
    original = reference.load_safetensors(TINY)
    assert meta["format"] == "rwkv-gpu model v1"
    for layer in range(2):
        for proj in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"):
            name = f"blocks.{layer}.{proj}.weight"
            assert meta[f"quant.{name}"] == fmt and name not in saved
            w = original[name].astype(np.float16).astype(np.float32)  # what the device quantized
            if proj == "ffn.value":  # stored input-major for sparse decode: [in, out]
                assert meta[f"layout.{name}"] == "input-major"
                w = np.ascontiguousarray(w.T)
            else:
                assert f"layout.{name}" not in meta
            codes, scales = saved[f"{name}.codes"], saved[f"{name}.scales"]
            if fmt == "int8":
                ref_codes, ref_scales, _ = qr.quantize_int8(w, block=64)
                assert codes.dtype == np.int8 and codes.shape == w.shape
                np.testing.assert_array_equal(codes.view(np.uint8), qr.unpack_bytes(ref_codes))
            else:
                ref_codes, ref_scales = qr.quantize_nf4(w)
                assert codes.dtype == np.uint8 and codes.shape == (w.shape[0], w.shape[1] // 2)
                nibbles = np.stack([codes & 15, codes >> 4], axis=-1).reshape(w.shape)  # low nibble = even column
                np.testing.assert_array_equal(nibbles, qr.unpack_nibbles(ref_codes))
            np.testing.assert_array_equal(scales, ref_scales.astype(np.float32))
    # Everything else keeps its official name, shape and layout (low-rank matrices
    # [in, out] as in the official .pth): 16-bit matrices as the fp16 the device held,
    # vectors as the f32 it used, the embedding table as loaded.
    quantized = {n for n in original if n.endswith(PROJECTION_SUFFIXES)}
    assert set(saved) == (set(original) - quantized) | {f"{n}.{p}" for n in quantized for p in ("codes", "scales")}
    for name in set(original) - quantized:
        fp16_matrix = name == "head.weight" or name.split(".")[-1] in LOW_RANK
        want = original[name].astype(np.float16).astype(np.float32) if fp16_matrix else original[name]
        assert saved[name].shape == want.shape, name
        np.testing.assert_array_equal(saved[name], want, err_msg=name)


def test_saved_model_refuses_another_quantization(tmp_path):
    path = tmp_path / "int8.safetensors"
    open_model(TINY, dtype="int8").save(path)
    with pytest.raises(rwkv_gpu.ModelLoadError, match=r"blocks\.0\.att\.receptance\.weight is saved as int8; it cannot be loaded as nf4"):
        open_model(path, dtype="nf4")
    assert open_model(path, dtype="int8").dtype == "int8"  # asking for what it holds is fine


def rewrite_metadata(src, dst, change):
    """Copies a safetensors file with `change(metadata)` applied to its header."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update({"quant.blocks.0.att.key.weight": "int3"}), r"saved in format \"int3\""),
    (lambda m: m.update({"quant.blocks.0.att.key.weight": "nf4"}), r"blocks\.0\.att\.key\.weight\.codes is I8 \[128, 128\]; expected U8 \[128, 64\]"),
    (lambda m: m.update({"quant.blocks.1.att.w1": "int8"}),
     r"blocks\.1\.att\.w1 is saved as int8, but only the big projections and the head are ever quantized"),
    # Square [128, 128], so its codes fit either layout: the layout itself must be refused.
    (lambda m: m.update({"layout.blocks.0.att.key.weight": "input-major"}),
     r"blocks\.0\.att\.key\.weight is saved input-major, but only ffn\.value\.weight \(read by sparse decode\) ever is"),
])
def test_damaged_saved_model_is_a_clear_load_error(tmp_path, change, message):
    good = tmp_path / "good.safetensors"
    open_model(TINY, dtype="int8").save(good)
    bad = tmp_path / "bad.safetensors"
    rewrite_metadata(good, bad, change)
    with pytest.raises(rwkv_gpu.ModelLoadError, match=message):
        open_model(bad)


def test_states_move_between_the_original_and_the_saved_model(tmp_path):
    """A saved model keeps the checkpoint's weight fingerprint."""
    original = open_model(TINY, dtype="nf4")
    original.save(tmp_path / "m.safetensors")
    saved = open_model(tmp_path / "m.safetensors")
    state = original.new_state()
    original.prefill(PROMPT, state)
    state.save(tmp_path / "state.safetensors")
    moved = saved.load_state(tmp_path / "state.safetensors")
    np.testing.assert_array_equal(moved.to_numpy()["wkv"], state.to_numpy()["wkv"])


def test_failed_save_leaves_no_file(tmp_path):
    model = open_model(TINY, dtype="int8")
    target = tmp_path / "missing-dir" / "m.safetensors"
    with pytest.raises(rwkv_gpu.ModelSaveError, match="missing-dir") as info:
        model.save(target)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOENT
    assert not target.parent.exists()
    # A successful save leaves only the file (the temporary is renamed).
    model.save(tmp_path / "m.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_quantize_command_line(tmp_path):
    out = tmp_path / "nf4.safetensors"
    done = subprocess.run([sys.executable, "-m", "rwkv_gpu.quantize", str(TINY), str(out), "--dtype", "nf4", "--quant-head"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model = open_model(out)
    assert model.dtype == "nf4" and model.weight_formats()["head"] == "int8"
    assert "nf4" in done.stdout and str(out) in done.stdout
    np.testing.assert_array_equal(logits_of(model), logits_of(open_model(TINY, dtype="nf4", quant_head=True)))
