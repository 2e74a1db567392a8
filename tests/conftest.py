"""Shared fixtures. Tests run on whatever adapter rwkv_gpu picks (lavapipe in CI);
they read data only from tests/data, never from outside the repository."""

from __future__ import annotations

import os
import sys
import threading
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


def assert_same_arithmetic(got, want, err_msg=""):
    """Outputs of two compiled variants (a kernel choice) that do the same multiplies and
    adds in the same order. They are equal to the bit unless the driver fused a multiply
    and an add into one rounding in one variant and not the other, which WGSL allows and
    lavapipe does differently per host CPU (the nf4 table and select variants of one
    model differed by 1.4e-6 on an AMD EPYC, not on the Intel hosts before it): a
    rounding or two per sum. Allowed: 2^-16 of the largest magnitude, 50x the largest
    difference seen; a wrong code, scale, row or token moves outputs by percents."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape, err_msg)
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=0, atol=scale * 2.0 ** -16, err_msg=err_msg)


def without_blocking(call, seconds=120):
    """`call()` run on a daemon thread: what it returns, or the exception it raised. A
    call still running after `seconds` fails the test instead of hanging the suite (a
    FIFO opened without a look first blocks until a writer comes)."""
    outcome = []

    def run():
        try:
            outcome.append((True, call()))
        except BaseException as e:  # noqa: BLE001 (handed back to the test)
            outcome.append((False, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call was still blocked after {seconds} s"
    (returned, value), = outcome
    if not returned:
        raise value
    return value


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
