"""The NumPy reference (tests/support/reference.py) against the official package's golden outputs.

Tolerance: 1e-4 absolute. The oracle (rwkv 0.8.32, 'cpu fp32') ran in float32; the
reference runs in float64 on the very same bf16 weights (widened exactly), so the only
differences are the oracle's fp32 rounding, accumulated over a few layers and tokens.
Measured: <= 4e-6 on tiny-rwkv7 and <= 9e-6 on trained-bytes, so 1e-4 leaves >10x
headroom while a wrong formula (an eps, a constant, an update order) moves logits by
far more.
"""
import json
import os
import struct
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import reference as ref  # noqa: E402

ATOL = 1e-4
STATE_KEYS = ("att_shift", "wkv", "ffn_shift")


def close(actual, expected, what):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=0, atol=ATOL, err_msg=what)


@pytest.fixture(scope="module")
def tiny():
    """Run the tiny model once: prompt from a zero state, then the step tokens."""
    w, c = ref.load_case("tiny-rwkv7")
    st = ref.new_state(w)
    prompt_logits = ref.forward(w, c["prompt"], st)
    prefill = {k: st[k].copy() for k in STATE_KEYS}
    step_logits = [ref.forward(w, [tok], st)[0] for tok in c["step_tokens"]]
    return dict(w=w, c=c, prompt_logits=prompt_logits, prefill=prefill,
                step_logits=np.array(step_logits), final=st)


def test_tiny_weights_loaded(tiny):
    w = tiny["w"]
    assert all(a.dtype == np.float32 for a in w.values())
    assert ref.dims(w) == (2, 128, 2, 64, 512)
    assert w["blocks.0.att.w1"].shape == (128, 32) and w["blocks.0.att.v1"].shape == (128, 16)


def test_tiny_prompt_logits_every_position(tiny):
    assert tiny["prompt_logits"].shape == (37, 512)
    for t in range(len(tiny["c"]["prompt"])):
        close(tiny["prompt_logits"][t], tiny["c"]["prompt_logits"][t], f"prompt position {t}")


@pytest.mark.parametrize("key", STATE_KEYS)
def test_tiny_prefill_state(tiny, key):
    close(tiny["prefill"][key], tiny["c"]["prefill_" + key], key)


def test_tiny_step_logits(tiny):
    c = tiny["c"]
    for s in range(len(c["step_tokens"])):
        close(tiny["step_logits"][s], c["step_logits"][s], f"step {s}")
    # each step token was the argmax of the previous logits
    prev = np.vstack([tiny["prompt_logits"][-1:], tiny["step_logits"][:-1]])
    assert list(prev.argmax(-1)) == list(c["step_tokens"])


@pytest.mark.parametrize("key", STATE_KEYS)
def test_tiny_final_state(tiny, key):
    close(tiny["final"][key], tiny["c"]["final_" + key], key)


def test_trained_bytes_logits():
    w, c = ref.load_case("trained-bytes")
    assert ref.dims(w) == (4, 256, 4, 64, 256)
    logits = ref.forward(w, c["tokens"], ref.new_state(w))
    assert logits.shape == (256, 256)
    close(logits, c["logits"], "trained-bytes logits")


# ---- the loader and the kernel references themselves ----

def test_load_safetensors_dtypes(tmp_path):
    x = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, -65504.0]], np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype("<u2")  # truncation; these values are exact anyway
    blobs = [("a", "F32", x.astype("<f4").tobytes()), ("b", "F16", x.astype("<f2").tobytes()),
             ("c", "BF16", bf16.tobytes())]
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, raw in blobs:
        header[name] = {"dtype": dt, "shape": [2, 3], "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header).encode()
    p = tmp_path / "t.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(r for _, _, r in blobs))
    got = ref.load_safetensors(str(p))
    assert set(got) == {"a", "b", "c"}
    np.testing.assert_array_equal(got["a"], x)
    np.testing.assert_array_equal(got["b"], x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got["c"], (bf16.astype(np.uint32) << 16).view(np.float32))
    assert all(a.dtype == np.float32 for a in got.values())


def test_group_norm_one_group_is_layer_norm():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(3, 128)), rng.normal(size=128), rng.normal(size=128)
    np.testing.assert_allclose(ref.group_norm(x, w, b, 1, 1e-5), ref.layer_norm(x, w, b, 1e-5))
    per_head = np.concatenate([ref.layer_norm(x[:, h * 64:(h + 1) * 64], w[h * 64:(h + 1) * 64],
                                              b[h * 64:(h + 1) * 64], 64e-5) for h in range(2)], -1)
    np.testing.assert_allclose(ref.group_norm(x, w, b, 2, 64e-5), per_head)


def test_wkv7_step_matches_explicit_loops():
    rng = np.random.default_rng(1)
    N = 8
    S = rng.normal(size=(N, N))
    r, k, v, a = (rng.normal(size=N) for _ in range(4))
    w = rng.uniform(0.55, 1.0, size=N)
    kk = ref.l2_normalize(rng.normal(size=N))
    S_new, y = ref.wkv7_step(S, r, w, k, v, kk, a)
    want = np.zeros((N, N))
    for i in range(N):          # value index
        sa = sum(S[i, m] * -kk[m] for m in range(N))
        for j in range(N):      # key index
            want[i, j] = S[i, j] * w[j] + sa * kk[j] * a[j] + v[i] * k[j]
    np.testing.assert_allclose(S_new, want, atol=1e-12)
    np.testing.assert_allclose(y, want @ r, atol=1e-12)
    # batched over heads == per head
    Sb = rng.normal(size=(3, N, N))
    vec = [rng.normal(size=(3, N)) for _ in range(6)]
    Sb_new, yb = ref.wkv7_step(Sb, *vec)
    for h in range(3):
        s1, y1 = ref.wkv7_step(Sb[h], *(t[h] for t in vec))
        np.testing.assert_allclose(Sb_new[h], s1)
        np.testing.assert_allclose(yb[h], y1)
