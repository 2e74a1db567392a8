"""Kernel choices timed per adapter and model shape (src/model/tuning.rs) and kept on
disk (src/gpu/tuning_cache.rs): written, reused, timed again when the driver or wgpu
changes, a foreign or corrupt file ignored with a warning, RWKV_GPU_TUNE=off and a
forced choice respected; the choice changes speed, not outputs (beyond the roundings a
driver's fusing of multiply-adds may move)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, assert_same_arithmetic, open_model, without_blocking

TINY = DATA / "tiny-rwkv7" / "model.safetensors"
PROMPT = [3, 17, 60, 2, 99]
HEADER = "rwkv-gpu kernel choices 1"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_GPU_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RWKV_GPU_TUNE", raising=False)
    monkeypatch.delenv("RWKV_GPU_NF4_LOOKUP", raising=False)
    for variable in ("RWKV_GPU_SPLIT_K", "RWKV_GPU_MATVEC_LANES", "RWKV_GPU_MATVEC_ROWS", "RWKV_GPU_MATVEC_DEPTH"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


def load(**options):
    """The tiny model in nf4 (NF4 decoding is what is tuned), with the load's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = rwkv_gpu.Model(TINY, dtype="nf4", **options)
    return model, [str(w.message) for w in caught if "kernel choices" in str(w.message)]


def chosen(model):
    """The cache file's text for the model's choice."""
    c = model.config
    return (f"nf4={c['nf4_lookup']} split={c['split_k']} lanes={c['matvec_lanes']} rows={c['matvec_rows']} "
            f"reduce={c['matvec_reduction']} depth={c['matvec_depth']}")


def candidates(model, everywhere=False):
    """What the cache key lists as timed for the tiny model, in the order timed (see
    tuning.rs): NF4 decoding (nf4 models), then, on GPUs or with RWKV_GPU_TUNE=all, the
    matvec workgroups and the split of the value projection; the device's defaults first."""
    c = model.config
    cpu = c["device_type"] == "cpu"
    more = everywhere or not cpu
    nf4 = ("select,table" if cpu else "table,select") if c["dtype"] == "nf4" else ("select" if cpu else "table")
    lanes = ("narrow,wide,widest" if cpu else "wide,widest") if more else "narrow"
    reduce = "subgroup,tree" if c["subgroups"] and more else ("subgroup" if c["subgroups"] else "tree")
    return (f"nf4={nf4} lanes={lanes} rows={'8,4' if more else '8'} depth={'1,2' if more else '1'} reduce={reduce} "
            f"split={'1,2,4' if more else '1'}")


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
    # a version that timed others is timed again).
    assert key.endswith("among " + candidates(first))
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
    # Both decode every code to the same f32 value; only the driver's fusing may differ.
    assert_same_arithmetic(out["table"], out["select"])
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


def test_a_named_pipe_in_its_place_is_ignored_with_a_warning(cache_dir):
    """Reading a FIFO blocks until a writer comes: the cache looks before it reads."""
    path = cache_dir / "tuning.txt"
    os.mkfifo(path)
    model, warned = without_blocking(load)
    assert model.config["tuning"] == "timed"
    assert warned == [f"ignored the kernel choices in {path}: not a regular file"]
    (_, choice), = entries(path)  # replaced by a regular file holding this shape's choice
    assert choice == chosen(model)


def test_tuning_off_and_models_with_nothing_to_tune(cache_dir, monkeypatch):
    # fp16 (no NF4 matrices) with the value projection kept dense (not splittable): on a
    # CPU device nothing to choose; a GPU still times the matvec workgroups.
    monkeypatch.setenv("RWKV_GPU_NO_SPARSE_FFN", "1")
    plain = rwkv_gpu.Model(TINY)
    cpu = plain.config["device_type"] == "cpu"
    assert plain.config["tuning"] == ("default" if cpu else "timed") and plain.config["split_k"] == 1
    monkeypatch.delenv("RWKV_GPU_NO_SPARSE_FFN")
    (cache_dir / "tuning.txt").unlink(missing_ok=True)
    monkeypatch.setenv("RWKV_GPU_TUNE", "off")
    off, _ = load()
    assert off.config["tuning"] == "off"
    # The device type's defaults: the select tree and 8-lane workgroups on CPU devices,
    # the table and 32/64 lanes elsewhere; 8 rows, one step deep, subgroupAdd where there
    # are subgroups.
    assert off.config["nf4_lookup"] == ("select" if cpu else "table")
    assert off.config["matvec_lanes"] == ("narrow" if cpu else "wide")
    assert off.config["matvec_rows"] == 8 and off.config["matvec_depth"] == 1
    assert off.config["matvec_reduction"] == ("subgroup" if off.config["subgroups"] else "tree")
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


def test_every_dimension_timed_when_asked(cache_dir, monkeypatch):
    """RWKV_GPU_TUNE=all times, on any device, the dimensions that CPU drivers have one
    answer for (split, matvec lanes, rows, depth, reduction): the key lists every candidate,
    the choice is one of them and cached, and whatever it is, decode stays within the
    golden tests' 1e-3 of the official logits (the candidates differ in the order of
    float sums, not in what they compute)."""
    monkeypatch.setenv("RWKV_GPU_TUNE", "all")
    first, _ = load()
    assert first.config["tuning"] == "timed"
    (key, choice), = entries(cache_dir / "tuning.txt")
    assert key.endswith("among " + candidates(first, everywhere=True))
    assert choice == chosen(first)
    assert first.config["matvec_lanes"] in ("narrow", "wide", "widest") and first.config["matvec_rows"] in (8, 4)
    assert first.config["matvec_depth"] in (1, 2)
    again, _ = load()
    assert again.config["tuning"] == "cached" and chosen(again) == chosen(first)
    np.testing.assert_array_equal(logits(first), logits(again))
    # The choice is what runs: the profile names the matvec variants of a decode step
    # (where the adapter has timestamp queries; without, nothing is profiled).
    if again._m.set_profiling(True):
        try:
            again.forward([1], again.new_state())
        finally:
            again._m.set_profiling(False)
        names = [name.split() for name, _, _ in again._m.last_profile() if name.startswith("matvec t1 ")]
        lanes = {"narrow": "l8", "widest": "l128"}.get(again.config["matvec_lanes"], "l32 or l64")
        assert names and all(n[2] in lanes.split(" or ") and n[3:5] == [f"r{again.config['matvec_rows']}",
                                                                         f"d{again.config['matvec_depth']}"]
                             for n in names)
        assert all(("sg" in n) == (again.config["matvec_reduction"] == "subgroup") for n in names)
    else:
        again._m.set_profiling(False)
    # Against the same model under the device's defaults: within 1e-3 whatever was chosen.
    monkeypatch.setenv("RWKV_GPU_TUNE", "off")
    default, _ = load()
    np.testing.assert_allclose(logits(again), logits(default), atol=1e-3, rtol=0)


def test_a_forced_matvec_shape_is_kept_untimed(cache_dir, monkeypatch):
    """RWKV_GPU_MATVEC_LANES, _ROWS and _DEPTH fix those dimensions: with everything else
    fixed too, nothing is timed and nothing written."""
    for variable, value in (("RWKV_GPU_MATVEC_LANES", "widest"), ("RWKV_GPU_MATVEC_ROWS", "4"),
                            ("RWKV_GPU_MATVEC_DEPTH", "2"), ("RWKV_GPU_SPLIT_K", "1"),
                            ("RWKV_GPU_NF4_LOOKUP", "table")):
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("RWKV_GPU_NO_SUBGROUPS", "1")  # the tree: the only reduction left
    model, _ = load()
    assert model.config["tuning"] == "forced"
    shape = ("matvec_lanes", "matvec_rows", "matvec_depth", "matvec_reduction")
    assert tuple(model.config[k] for k in shape) == ("widest", 4, 2, "tree")
    assert not (cache_dir / "tuning.txt").exists()
