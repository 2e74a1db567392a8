"""Hugging Face checkpoints in flash-linear-attention's layout (the fla-hub
`RWKV7ForCausalLM` models): a folder or the .safetensors file itself, one file or shards,
the older fused `attn.x_x`, config.json cross-checked. `tiny-rwkv7-hf` holds the same bf16
weights as `tiny-rwkv7`, so the model must give bit-identical logits (and hence the
golden ones, checked to 1e-3 in test_golden.py)."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, open_model, without_blocking
from support.safetensors_writer import read_raw, write_safetensors

HF = DATA / "tiny-rwkv7-hf"
OFFICIAL = DATA / "tiny-rwkv7" / "model.safetensors"


@pytest.fixture(scope="module")
def expected(tiny_cases):
    model = open_model(OFFICIAL)
    return model.forward(tiny_cases["prompt"], model.new_state(), all_logits=True)


@pytest.fixture(scope="module")
def hf_raw():
    return read_raw(HF / "model.safetensors")


def logits(path, cases, **options):
    model = open_model(path, **options)
    return model.forward(cases["prompt"], model.new_state(), all_logits=True)


@pytest.mark.parametrize("where", ["folder", "file"])
def test_hf_checkpoint_gives_the_official_logits(tiny_cases, expected, where):
    path = HF if where == "folder" else HF / "model.safetensors"
    got = logits(path, tiny_cases)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got, tiny_cases["prompt_logits"], atol=1e-3, rtol=0)


def test_hf_checkpoint_under_the_fallbacks_and_quantized(tiny_cases):
    official = open_model(OFFICIAL, dtype="int8", max_binding=65536)
    hf = open_model(HF, dtype="int8", max_binding=65536)
    tokens = tiny_cases["prompt"][:9]
    np.testing.assert_array_equal(hf.forward(tokens, hf.new_state(), all_logits=True),
                                  official.forward(tokens, official.new_state(), all_logits=True))


def test_older_layout_with_fused_x_x(tmp_path, hf_raw, tiny_cases, expected):
    tensors = {}
    for name, a in hf_raw.items():
        if ".attn.x_" in name:
            continue
        tensors[name] = a
    for i in (0, 1):
        mixes = [hf_raw[f"model.layers.{i}.attn.x_{p}"].reshape(-1) for p in "rwkvag"]
        tensors[f"model.layers.{i}.attn.x_x"] = np.stack(mixes)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    np.testing.assert_array_equal(logits(tmp_path / "model.safetensors", tiny_cases), expected)


def write_sharded(folder, raw, config=None):
    names = sorted(raw)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in shards.items():
        write_safetensors(folder / file, {n: raw[n] for n in part})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(HF / "config.json", folder / "config.json")


def test_sharded_folder(tmp_path, hf_raw, tiny_cases, expected):
    write_sharded(tmp_path, hf_raw)
    np.testing.assert_array_equal(logits(tmp_path, tiny_cases), expected)


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "C:elsewhere.safetensors"])  # a path; a Windows drive
def test_sharded_index_cannot_point_outside_the_folder(tmp_path, hf_raw, shard):
    write_sharded(tmp_path, hf_raw)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = shard
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(rwkv_gpu.ModelLoadError, match=r"is not a file name in the model folder"):
        open_model(tmp_path)


@pytest.mark.parametrize("sharded, pipe", [(True, "model-00002-of-00002.safetensors"),
                                           (True, "model.safetensors.index.json"),
                                           (False, "model.safetensors"),
                                           (False, "config.json")])
def test_a_file_that_is_a_named_pipe_is_refused_without_blocking(tmp_path, hf_raw, sharded, pipe):
    """Opening a FIFO blocks until a writer comes; the loader must look before it opens,
    and name the file rather than call the folder empty."""
    if sharded:
        write_sharded(tmp_path, hf_raw)
    else:
        write_safetensors(tmp_path / "model.safetensors", hf_raw)
        shutil.copy(HF / "config.json", tmp_path / "config.json")
    (tmp_path / pipe).unlink()
    os.mkfifo(tmp_path / pipe)
    with pytest.raises(rwkv_gpu.ModelLoadError, match=f"{re.escape(pipe)}: not a regular file"):
        without_blocking(lambda: open_model(tmp_path))


@pytest.mark.parametrize("v_low_rank_dim", [0, 2**40])
def test_one_layer_model_takes_a_bounded_v_width_from_config_json(tmp_path, hf_raw, v_low_rank_dim):
    """Layer 0 has no v_lora (it never reads one), so a one-layer model's width comes
    from config.json, which must be held to the bounds every width from a tensor is."""
    one_layer = {n: a for n, a in hf_raw.items() if ".layers.1." not in n}
    write_safetensors(tmp_path / "model.safetensors", one_layer)
    config = json.loads((HF / "config.json").read_text())
    config.update(num_hidden_layers=1, v_low_rank_dim=v_low_rank_dim)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(rwkv_gpu.ModelLoadError,
                       match=rf"config\.json v_low_rank_dim has low-rank width {v_low_rank_dim}; expected 1 to n_embd \(128\)"):
        open_model(tmp_path)
    config["v_low_rank_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert open_model(tmp_path).config["lora_widths"][2] == 16


@pytest.mark.parametrize("key, value, says", [
    ("hidden_size", 256, "config.json hidden_size says 256, but the tensors give 128"),
    ("num_hidden_layers", 3, "config.json num_hidden_layers says 3, but the tensors give 2"),
    ("v_low_rank_dim", 32, "config.json v_low_rank_dim says 32, but the tensors give 16"),
    ("model_type", "llama", "model_type is \"llama\""),
])
def test_config_json_that_disagrees_with_the_tensors(tmp_path, key, value, says):
    shutil.copy(HF / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((HF / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(rwkv_gpu.ModelLoadError) as info:
        open_model(tmp_path)
    assert says in str(info.value)


def test_folder_without_weights_is_a_clear_error(tmp_path):
    shutil.copy(HF / "config.json", tmp_path / "config.json")
    with pytest.raises(rwkv_gpu.ModelLoadError, match="not a Hugging Face model folder"):
        open_model(tmp_path)


@pytest.mark.parametrize("extra, copy_of, says", [
    ("model.layers.1.attn.extra", "model.layers.1.attn.k_k", r"unexpected tensor model\.layers\.1\.attn\.extra"),
    ("blocks.1.att.r_k", "model.layers.1.attn.r_k",
     r"model\.layers\.1\.attn\.r_k and blocks\.1\.att\.r_k both give blocks\.1\.att\.r_k"),
], ids=["nobody's", "given twice"])
def test_an_extra_tensor_in_an_fla_file_is_reported(tmp_path, hf_raw, extra, copy_of, says):
    """Under its own name when no official name is its; when fla's name and the official
    one both give a tensor, neither silently wins."""
    tensors = dict(hf_raw)
    tensors[extra] = hf_raw[copy_of]
    write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(rwkv_gpu.ModelLoadError, match=says):
        open_model(tmp_path / "model.safetensors")


def test_save_writes_official_names_and_round_trips(tmp_path, tiny_cases, expected):
    model = open_model(HF)
    model.save(tmp_path / "converted.safetensors")
    names = set(read_raw(tmp_path / "converted.safetensors"))
    official = set(read_raw(OFFICIAL))
    assert names == official
    np.testing.assert_array_equal(logits(tmp_path / "converted.safetensors", tiny_cases), expected)


def test_tokenizer_json_in_the_folder_is_used(tmp_path):
    for f in ("model.safetensors", "config.json"):
        shutil.copy(HF / f, tmp_path / f)
    vocab = {f"t{i}": i for i in range(512)}
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
                 "pre_tokenizer": {"type": "Whitespace"}, "added_tokens": [], "normalizer": None,
                 "post_processor": None, "decoder": None, "truncation": None, "padding": None}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    model = open_model(tmp_path)
    assert model.tokenizer.encode("t5 t7 t300") == [5, 7, 300]
