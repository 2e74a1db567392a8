"""`python -m rwkv_gpu.doctor` on this machine's lavapipe, with no Vulkan driver visible,
and with an RWKV_GPU_ADAPTER that matches nothing: what it finds, the fix it gives, and
its exit code (0 when a Model could open an adapter)."""

from __future__ import annotations

import os
import subprocess
import sys


def doctor(**env):
    full = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([sys.executable, "-m", "rwkv_gpu.doctor"], capture_output=True, text=True, timeout=300, env=full)


def test_lavapipe_is_found_used_and_called_software():
    out = doctor()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Vulkan loader: " in out.stdout and "not found" not in out.stdout.split("\n")[1]
    assert "llvmpipe" in out.stdout and "a Model would use: " in out.stdout
    assert "only a software adapter" in out.stdout and "mesa-vulkan-drivers" in out.stdout
    assert "Traceback" not in out.stderr


def test_no_vulkan_driver_visible():
    missing = "/nonexistent/icd.json"
    out = doctor(VK_ICD_FILENAMES=missing, VK_DRIVER_FILES=missing)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no Vulkan, Metal or DX12 adapter" in out.stdout and "apt-get install libvulkan1 mesa-vulkan-drivers" in out.stdout
    assert "Traceback" not in out.stderr


def test_adapter_choice_matching_nothing():
    out = doctor(RWKV_GPU_ADAPTER="no-such-gpu")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "RWKV_GPU_ADAPTER='no-such-gpu': no adapter matches" in out.stdout and "unset it" in out.stdout
