"""Kernel choices timed per adapter and model shape (src/model/tuning.rs) and kept on
disk (src/gpu/tuning_cache.rs): written, reused, timed again when the driver or wgpu
changes, a foreign or corrupt file ignored with a warning, RWKV_GPU_TUNE=off and a
forced choice respected; the choice changes speed, never outputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA

TINY = DATA / "tiny-rwkv7" / "model.safetensors"
PROMPT = [3, 17, 60, 2, 99]
HEADER = "rwkv-gpu kernel choices 1"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_GPU_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RWKV_GPU_TUNE", raising=False)
    monkeypatch.delenv("RWKV_GPU_NF4_LOOKUP", raising=False)
    return tmp_path


def load(**options):
    """The tiny model in nf4 (NF4 decoding is what is tuned), with the load's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = rwkv_gpu.Model(TINY, dtype="nf4", **options)
    return model, [str(w.message) for w in caught if "kernel choices" in str(w.message)]


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
    assert choice == f"nf4={first.config['nf4_lookup']}"
    second, _ = load()
    assert second.config["tuning"] == "cached"
    assert second.config["nf4_lookup"] == first.config["nf4_lookup"]
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
    assert choice == f"nf4={model.config['nf4_lookup']}"
    again, warned = load()
    assert again.config["tuning"] == "cached" and not warned


def test_tuning_off_and_models_with_nothing_to_tune(cache_dir, monkeypatch):
    plain = rwkv_gpu.Model(TINY)  # fp16: no NF4 matrices
    assert plain.config["tuning"] == "default"
    monkeypatch.setenv("RWKV_GPU_TUNE", "off")
    off, _ = load()
    assert off.config["tuning"] == "off"
    # The device type's default: the select tree on CPU devices, the table elsewhere.
    assert off.config["nf4_lookup"] == ("select" if off.config["device_type"] == "cpu" else "table")
    assert not (cache_dir / "tuning.txt").exists()
