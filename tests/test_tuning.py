"""Kernel choices timed per adapter and model shape (src/model/tuning.rs) and kept on
disk (src/gpu/tuning_cache.rs): written, reused, timed again when the driver or wgpu
changes, a foreign or corrupt file ignored with a warning, RWKV_GPU_TUNE=off and a
forced choice respected; the choice changes speed, never outputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, open_model

TINY = DATA / "tiny-rwkv7" / "model.safetensors"
PROMPT = [3, 17, 60, 2, 99]
HEADER = "rwkv-gpu kernel choices 1"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_GPU_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RWKV_GPU_TUNE", raising=False)
    monkeypatch.delenv("RWKV_GPU_NF4_LOOKUP", raising=False)
    monkeypatch.delenv("RWKV_GPU_SPLIT_K", raising=False)
    return tmp_path


def load(**options):
    """The tiny model in nf4 (NF4 decoding is what is tuned), with the load's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = rwkv_gpu.Model(TINY, dtype="nf4", **options)
    return model, [str(w.message) for w in caught if "kernel choices" in str(w.message)]


def chosen(model):
    """The cache file's text for the model's choice."""
    return f"nf4={model.config['nf4_lookup']} split={model.config['split_k']}"


def logits(model):
    return model.forward(PROMPT, model.new_state(), all_logits=True)


def entries(path):
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER
    return [line.split("\t") for line in lines[1:]]


def test_timed_once_then_read_from_the_cache(cache_dir):
    first, warned = load()
    assert first.config["tuning"] == "timed" and not warned
    (key, choice), = entries(cache_dir / "tuning.txt")
    assert first.config["adapter"] in key and " | 30.0.1 | " in key  # adapter ... wgpu version ... shape
    assert choice == chosen(first)
    # The key names the candidates timed, the device's defaults first (a cache written by
    # a version that timed fewer is timed again).
    cpu = first.config["device_type"] == "cpu"
    lookups, splits = (("select", "table"), (1,)) if cpu else (("table", "select"), (1, 2, 4))
    assert key.endswith("among " + ";".join(f"nf4={n} split={k}" for n in lookups for k in splits))
    second, _ = load()
    assert second.config["tuning"] == "cached"
    assert chosen(second) == chosen(first)
    # Either choice gives the same outputs, bit for bit.
    np.testing.assert_array_equal(logits(first), logits(second))


def test_each_choice_gives_the_same_outputs(cache_dir, monkeypatch):
    out = {}
    for lookup in ("table", "select"):
        monkeypatch.setenv("RWKV_GPU_NF4_LOOKUP", lookup)
        model, _ = load()
        assert model.config["tuning"] == "forced" and model.config["nf4_lookup"] == lookup
        out[lookup] = logits(model)
    np.testing.assert_array_equal(out["table"], out["select"])
    assert not (cache_dir / "tuning.txt").exists()  # nothing timed, nothing written


def test_a_new_driver_or_wgpu_is_timed_again(cache_dir):
    load()
    path = cache_dir / "tuning.txt"
    (key, choice), = entries(path)
    stale = key.replace(" | 30.0.1 | ", " | 29.0.0 | ")  # an entry written through another wgpu
    assert stale != key
    path.write_text(f"{HEADER}\n{stale}\t{choice}\n")
    model, warned = load()
    assert model.config["tuning"] == "timed" and not warned
    assert [k for k, _ in entries(path)] == [stale, key]  # the other entry is kept


@pytest.mark.parametrize("content", [b"\x00\xff not text", b"some other file\n", (HEADER + "\nno tab here\n").encode()],
                         ids=["binary", "foreign", "bad-line"])
def test_a_corrupt_cache_is_ignored_with_a_warning(cache_dir, content):
    path = cache_dir / "tuning.txt"
    path.write_bytes(content)
    model, warned = load()
    assert model.config["tuning"] == "timed"
    assert len(warned) == 1 and str(path) in warned[0]
    (_, choice), = entries(path)  # rewritten with what parsed, and this shape's choice
    assert choice == chosen(model)
    again, warned = load()
    assert again.config["tuning"] == "cached" and not warned


def test_tuning_off_and_models_with_nothing_to_tune(cache_dir, monkeypatch):
    # fp16 (no NF4 matrices) with the value projection kept dense (not splittable).
    monkeypatch.setenv("RWKV_GPU_NO_SPARSE_FFN", "1")
    plain = rwkv_gpu.Model(TINY)
    assert plain.config["tuning"] == "default" and plain.config["split_k"] == 1
    monkeypatch.delenv("RWKV_GPU_NO_SPARSE_FFN")
    monkeypatch.setenv("RWKV_GPU_TUNE", "off")
    off, _ = load()
    assert off.config["tuning"] == "off"
    # The device type's default: the select tree on CPU devices, the table elsewhere.
    assert off.config["nf4_lookup"] == ("select" if off.config["device_type"] == "cpu" else "table")
    assert off.config["split_k"] == 1
    assert not (cache_dir / "tuning.txt").exists()


def test_splits_timed_on_gpus_only_and_a_forced_split_is_kept(cache_dir, monkeypatch):
    """fp16 has no NF4 decoding to choose: what is left is the split of the decode value
    projection, timed on GPUs (so the load writes the cache) and not on CPU drivers,
    whose workgroups outnumber the cores already. RWKV_GPU_SPLIT_K fixes it untimed."""
    plain = open_model(TINY)
    if plain.config["device_type"] == "cpu":
        assert plain.config["tuning"] == "default" and plain.config["split_k"] == 1
        assert not (cache_dir / "tuning.txt").exists()
    else:
        assert plain.config["tuning"] == "timed" and plain.config["split_k"] in (1, 2, 4)
        (_, choice), = entries(cache_dir / "tuning.txt")
        assert choice == chosen(plain)
    (cache_dir / "tuning.txt").unlink(missing_ok=True)
    monkeypatch.setenv("RWKV_GPU_SPLIT_K", "4")
    forced = open_model(TINY)
    assert forced.config["tuning"] == "forced" and forced.config["split_k"] == 4
    assert not (cache_dir / "tuning.txt").exists()
