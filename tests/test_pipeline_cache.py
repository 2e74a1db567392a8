"""The on-disk pipeline cache (src/gpu/pipeline_cache.rs): written after kernels are
compiled, in an envelope of our own; a corrupt or foreign file is ignored (the model
works and the file is replaced by a good one); `RWKV_GPU_CACHE_DIR=off` writes nothing.
Each case runs in a child process, since the directory is read when a device opens."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

from conftest import DATA

TINY = DATA / "tiny-rwkv7" / "model.safetensors"
CHILD = f"""
import warnings
warnings.simplefilter("ignore")
import numpy as np
import rwkv_gpu
m = rwkv_gpu.Model({str(TINY)!r})
cases = np.load({str(DATA / "tiny-rwkv7" / "cases.npz")!r})
np.testing.assert_allclose(m.forward(cases["prompt"][:4], m.new_state(), all_logits=True), cases["prompt_logits"][:4], atol=1e-3, rtol=0)
print("ok")
"""


def run(cache_dir) -> None:
    env = {**os.environ, "RWKV_GPU_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def cache_files(d):
    return [p for p in d.iterdir() if p.name.startswith("wgpu_pipeline_cache_")] if d.exists() else []


def test_written_after_compiling_and_read_back(tmp_path):
    run(tmp_path)
    (file,) = cache_files(tmp_path)
    data = file.read_bytes()
    assert data[:8] == b"RWKVPLC1" and struct.unpack("<Q", data[8:16])[0] == len(data) - 24
    run(tmp_path)  # starts from it
    assert cache_files(tmp_path) == [file]


def test_corrupt_or_foreign_file_is_ignored_and_replaced(tmp_path):
    run(tmp_path)
    (file,) = cache_files(tmp_path)
    good = file.read_bytes()
    truncated = good[:len(good) // 2]
    flipped = good[:-1] + bytes([good[-1] ^ 0xFF])
    # A whole envelope around bytes that are not a wgpu cache (another program's, or
    # another driver's): our hash matches, wgpu refuses the header and starts empty.
    foreign_data = b"not a pipeline cache" * 10
    h = 0xCBF29CE484222325
    for b in foreign_data:
        h = ((h ^ b) * 0x100000001B3) % 2**64
    foreign = b"RWKVPLC1" + struct.pack("<QQ", len(foreign_data), h) + foreign_data
    for bad in (b"", b"garbage" * 100, truncated, flipped, foreign):
        file.write_bytes(bad)
        run(tmp_path)
        assert file.read_bytes()[:8] == b"RWKVPLC1"


def test_a_named_pipe_in_its_place_is_ignored_without_blocking(tmp_path):
    """Reading a FIFO blocks until a writer comes: the cache looks before it reads (a
    regression times the child out), then replaces it with a good file."""
    run(tmp_path)
    (file,) = cache_files(tmp_path)
    file.unlink()
    os.mkfifo(file)
    run(tmp_path)
    assert file.is_file() and file.read_bytes()[:8] == b"RWKVPLC1"


def test_off_writes_nothing(tmp_path):
    home = tmp_path / "home"
    env_dir = "off"
    env = {**os.environ, "RWKV_GPU_CACHE_DIR": env_dir, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not (home / ".cache" / "rwkv-gpu").exists()


def test_default_location_is_the_user_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RWKV_GPU_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert cache_files(tmp_path / "xdg" / "rwkv-gpu")
