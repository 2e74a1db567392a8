"""Shared fixtures. Tests run on whatever adapter rwkv_gpu picks (lavapipe in CI);
they read data only from tests/data, never from outside the repository."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(Path(__file__).parent))

# Prefill on cooperative matrices (GPUs with matrix units) multiplies f16 operands, which
# moves logits by ~5e-3: more than the 1e-3 the golden tests hold the f32 kernels to. The
# suite runs with it off; tests/test_coop_matrix.py turns it on and holds it to its own
# tolerance.
os.environ["RWKV_GPU_NO_COOP_MATRIX"] = "1"

# The switches that force the portable paths on a capable device. max_binding=65536
# makes the tiny model split its head and embedding-sized matrices and its prefill into
# several chunks, as a 2.9B model does on a device that binds at most 128 MiB.
FALLBACKS = {
    "default": {},
    "no_f16": {"no_f16": True},
    "no_subgroups": {"no_subgroups": True},
    "max_binding_64k": {"max_binding": 65536},
}


@pytest.fixture(scope="session")
def tiny_cases():
    return np.load(DATA / "tiny-rwkv7" / "cases.npz")


def open_model(path, **options):
    import rwkv_gpu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the software-adapter warning
        return rwkv_gpu.Model(path, **options)


@pytest.fixture(scope="session")
def tiny_model():
    return open_model(DATA / "tiny-rwkv7" / "model.safetensors")
