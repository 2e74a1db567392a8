"""The whole model against the official package's outputs (tests/data/tiny-rwkv7).

Tolerance 1e-3 absolute: bf16 -> fp16 is exact for these weights and all activations
and the state are f32, so a correct runtime lands near 1e-5 (we measure ~5e-6); a wrong
GroupNorm epsilon moves logits by ~1e-2 and a wrong recurrence order by >0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import DATA, FALLBACKS, assert_same_arithmetic, open_model

TOL = 1e-3


# Every fallback on the safetensors file; the .pth file once.
CASES = [("safetensors", f) for f in FALLBACKS] + [("pth", "default")]


@pytest.mark.parametrize("fmt,fallback", CASES)
def test_prompt_and_steps_match_official(fmt, fallback, tiny_cases):
    c = tiny_cases
    model = open_model(DATA / "tiny-rwkv7" / f"model.{fmt}", **FALLBACKS[fallback])
    state = model.new_state()
    logits = model.forward(c["prompt"], state, all_logits=True)
    assert logits.shape == c["prompt_logits"].shape and logits.dtype == np.float32
    np.testing.assert_allclose(logits, c["prompt_logits"], atol=TOL, rtol=0)
    s = state.to_numpy()
    for name in ("att_shift", "wkv", "ffn_shift"):
        np.testing.assert_allclose(s[name], c[f"prefill_{name}"], atol=TOL, rtol=0, err_msg=name)
    for i, token in enumerate(c["step_tokens"]):
        step = model.forward([int(token)], state)
        np.testing.assert_allclose(step, c["step_logits"][i], atol=TOL, rtol=0, err_msg=f"step {i}")
    s = state.to_numpy()
    for name in ("att_shift", "wkv", "ffn_shift"):
        np.testing.assert_allclose(s[name], c[f"final_{name}"], atol=TOL, rtol=0, err_msg=name)
    model.close()


def test_trained_model_logits(tmp_path):
    """A second checkpoint with other widths (4 layers, 256 wide, vocab 256)."""
    cases = np.load(DATA / "trained-bytes" / "cases.npz")
    model = open_model(DATA / "trained-bytes" / "model.safetensors")
    assert model.config["n_layer"] == 4 and model.config["vocab_size"] == 256
    logits = model.forward(cases["tokens"], model.new_state(), all_logits=True)
    np.testing.assert_allclose(logits, cases["logits"], atol=TOL, rtol=0)


def test_prefill_equals_single_steps(tiny_model, tiny_cases):
    """Chunked matrix-matrix prefill and one-token decode give the same state and logits
    (different summation orders: within 1e-4)."""
    prompt = tiny_cases["prompt"]
    a, b = tiny_model.new_state(), tiny_model.new_state()
    tiny_model.prefill(prompt[:-1], a)
    last_a = tiny_model.forward(prompt[-1:], a)
    for t in prompt[:-1]:
        tiny_model.forward([int(t)], b)
    last_b = tiny_model.forward(prompt[-1:], b)
    np.testing.assert_allclose(last_a, last_b, atol=1e-4, rtol=0)
    sa, sb = a.to_numpy(), b.to_numpy()
    for name in sa:
        np.testing.assert_allclose(sa[name], sb[name], atol=1e-4, rtol=0, err_msg=name)


def test_same_input_gives_bit_identical_output(tiny_model, tiny_cases):
    outs = [tiny_model.forward(tiny_cases["prompt"], tiny_model.new_state(), all_logits=True) for _ in range(2)]
    assert np.array_equal(outs[0], outs[1])


def test_against_numpy_reference_on_other_shape():
    """Shapes are read, not assumed: a random model with 3 layers, 192 wide (3 heads) and
    an odd vocabulary, written as .pth by our torch-free writer, against the float64
    NumPy reference. Tolerance 1e-3 as above; fp16-representable weights on both sides."""
    import os
    import tempfile

    from support import reference
    from support.pth_writer import write_pth

    rng = np.random.default_rng(7)
    L, C, V = 3, 192, 301
    widths = {"w": 32, "a": 32, "v": 16, "g": 64}
    t: dict[str, np.ndarray] = {"emb.weight": rng.uniform(-1, 1, (V, C)), "head.weight": rng.uniform(-0.1, 0.1, (V, C))}
    t["blocks.0.ln0.weight"] = rng.uniform(0.8, 1.2, C)
    t["blocks.0.ln0.bias"] = rng.uniform(-0.1, 0.1, C)
    t["ln_out.weight"] = rng.uniform(0.8, 1.2, C)
    t["ln_out.bias"] = rng.uniform(-0.1, 0.1, C)
    for i in range(L):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2", "att.ln_x"):
            t[b + ln + ".weight"] = rng.uniform(0.8, 1.2, C)
            t[b + ln + ".bias"] = rng.uniform(-0.1, 0.1, C)
        for v in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            t[b + "att." + v] = rng.uniform(0, 1, (1, 1, C))
        t[b + "att.w0"] = rng.uniform(-4, 0, (1, 1, C))
        for v in ("a0", "v0"):
            t[b + "att." + v] = rng.uniform(-1, 1, (1, 1, C))
        t[b + "att.k_k"] = rng.uniform(0.5, 1, (1, 1, C))
        t[b + "att.k_a"] = rng.uniform(0.8, 1.2, (1, 1, C))
        t[b + "att.r_k"] = rng.uniform(-0.5, 0.5, (C // 64, 64))
        for p, d in widths.items():
            t[b + f"att.{p}1"] = rng.uniform(-0.1, 0.1, (C, d))
            t[b + f"att.{p}2"] = rng.uniform(-0.1, 0.1, (d, C))
        for m in ("receptance", "key", "value", "output"):
            t[b + f"att.{m}.weight"] = rng.uniform(-0.07, 0.07, (C, C))
        t[b + "ffn.x_k"] = rng.uniform(0, 1, (1, 1, C))
        t[b + "ffn.key.weight"] = rng.uniform(-0.07, 0.07, (4 * C, C))
        t[b + "ffn.value.weight"] = rng.uniform(-0.035, 0.035, (C, 4 * C))
    t = {k: v.astype(np.float16) for k, v in t.items()}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "other.pth")
        write_pth(path, t, prefix="other_model", share_storage=True)
        model = open_model(path)
        cfg = model.config
        assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"]) == (L, C, 3, V)
        tokens = rng.integers(0, V, 20)
        got = model.forward(tokens, model.new_state(), all_logits=True)
    weights = {k: v.astype(np.float64) for k, v in t.items()}
    state = reference.new_state(weights)
    want = reference.forward(weights, tokens, state)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# Workgroup shapes (lanes, rows, depth) the tuner may pick: every lane count and row
# count, and two steps deep. The tiny model's rows are 16 fp16 vec4s, so only 8 lanes
# ("narrow") take second steps; "wide" at depth 2 checks that a GPU's lane count with
# every second step past the row (clamped, not added) compiles and changes nothing.
MATVEC_SHAPES = [("wide", 8, 1), ("narrow", 8, 1), ("widest", 8, 1), ("narrow", 4, 1), ("widest", 4, 1),
                 ("wide", 8, 2), ("narrow", 8, 2), ("narrow", 4, 2)]


@pytest.mark.parametrize("lanes, rows, depth", MATVEC_SHAPES)
def test_every_matvec_shape_matches_the_official_decode(monkeypatch, tiny_cases, lanes, rows, depth):
    """Decode with each matvec workgroup shape the tuner may pick (the GPUs' 32/64 lanes
    or 128, the CPU devices' 8; 8 or 4 rows; 1 or 2 steps loaded at once): each step's
    logits within TOL of the official ones (shapes differ only in the order of the
    per-lane partial sums). The tree reduction is the no_subgroups fallback of the tests
    above."""
    monkeypatch.setenv("RWKV_GPU_MATVEC_LANES", lanes)
    monkeypatch.setenv("RWKV_GPU_MATVEC_ROWS", str(rows))
    monkeypatch.setenv("RWKV_GPU_MATVEC_DEPTH", str(depth))
    model = open_model(DATA / "tiny-rwkv7" / "model.safetensors")
    shape = (model.config["matvec_lanes"], model.config["matvec_rows"], model.config["matvec_depth"])
    assert shape == (lanes, rows, depth)
    state = model.new_state()
    steps = [model.forward([t], state) for t in tiny_cases["prompt"]]
    np.testing.assert_allclose(np.stack(steps), tiny_cases["prompt_logits"], atol=TOL, rtol=0)


# Run in a fresh process with lavapipe's vectors at 128 bits (its subgroups then have 4
# lanes): the prompt through the default kernels, then decode under each matvec shape;
# prints the largest difference from the official logits per case.
NARROW_SUBGROUPS = textwrap.dedent("""
    import json, os, sys, warnings
    import numpy as np
    import rwkv_gpu
    warnings.simplefilter("ignore", RuntimeWarning)
    data, path = sys.argv[1], sys.argv[2]
    cases = np.load(os.path.join(data, "cases.npz"))
    out = {"subgroup_sizes": rwkv_gpu.adapters()[0]["subgroup_sizes"]}
    model = rwkv_gpu.Model(path)
    got = model.forward(cases["prompt"], model.new_state(), all_logits=True)
    out["prefill"] = float(np.abs(got - cases["prompt_logits"]).max())
    for lanes, rows, depth in json.loads(sys.argv[3]):
        os.environ["RWKV_GPU_MATVEC_LANES"], os.environ["RWKV_GPU_MATVEC_ROWS"] = lanes, str(rows)
        os.environ["RWKV_GPU_MATVEC_DEPTH"] = str(depth)
        model = rwkv_gpu.Model(path)
        state = model.new_state()
        steps = np.stack([model.forward([int(t)], state) for t in cases["prompt"]])
        out[f"decode {lanes} x {rows} x {depth}"] = float(np.abs(steps - cases["prompt_logits"]).max())
    print(json.dumps(out))
""")


def test_subgroups_of_four_lanes_match_the_official_outputs():
    """The subgroup reductions assume no width (lavapipe's 8 in CI, NVIDIA's 32, AMD's 32
    or 64, some mobile GPUs' 4): on lavapipe with 128-bit vectors (4-lane subgroups) the
    prompt and decode under every matvec shape stay within TOL of the official logits."""
    import rwkv_gpu

    if rwkv_gpu.adapters()[0]["driver"] != "llvmpipe":
        pytest.skip("the subgroup width is set through lavapipe's LP_NATIVE_VECTOR_WIDTH")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_GPU_MATVEC_")}
    env["LP_NATIVE_VECTOR_WIDTH"] = "128"
    tiny = DATA / "tiny-rwkv7"
    done = subprocess.run([sys.executable, "-c", NARROW_SUBGROUPS, str(tiny), str(tiny / "model.safetensors"),
                           json.dumps(MATVEC_SHAPES)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out.pop("subgroup_sizes") == [4, 4]
    assert len(out) == 1 + len(MATVEC_SHAPES) and all(diff <= TOL for diff in out.values()), out


@pytest.mark.parametrize("dtype", ["fp16", "int8", "nf4"])
def test_staged_and_direct_prefill_loads_do_the_same_arithmetic(monkeypatch, tiny_cases, dtype):
    """The SIMT prefill kernel's two ways of getting operands (staged through workgroup
    memory on GPUs, direct on CPU drivers) give the same logits (as the same arithmetic
    does: conftest.assert_same_arithmetic). Direct loads
    take every dispatch without nf4 (each reading thread decodes a weight again, too
    dear for NF4 codes); a dispatch of one format compiles that format alone, one that
    mixes the low-rank f16 matrices with quantized r/k/v compiles both."""
    outs, profiles = {}, {}
    for loads in ("staged", "direct"):
        monkeypatch.setenv("RWKV_GPU_GEMM_LOADS", loads)
        model = open_model(DATA / "tiny-rwkv7" / "model.safetensors", dtype=dtype)
        assert model.config["gemm_loads"] == loads
        outs[loads] = model.forward(tiny_cases["prompt"], model.new_state(), all_logits=True)
        if model._m.set_profiling(True):
            model.forward(tiny_cases["prompt"], model.new_state())
            profiles[loads] = [name for name, _, _ in model._m.last_profile() if name.startswith("matmul_")]
        model.close()
    assert_same_arithmetic(outs["direct"], outs["staged"])
    if dtype == "fp16":  # (the quantized models' accuracy: test_quant.py)
        np.testing.assert_allclose(outs["direct"], tiny_cases["prompt_logits"], atol=TOL, rtol=0)
    if profiles:
        assert profiles["staged"] and all(n.startswith("matmul_tiled ") for n in profiles["staged"])
        labels = {n.split(" ")[1] for n in profiles["direct"]}  # the variant's formats
        assert labels == ({"f16"} if dtype == "fp16" else {"f16", dtype, f"f16+{dtype}"})
        for name in profiles["direct"]:
            assert name.startswith("matmul_tiled " if "nf4" in name else "matmul_direct "), name


def test_the_chunk_size_changes_no_bits(monkeypatch):
    """Prefill chunks of 64, 256 (CPU devices' default) and 512 tokens (GPUs') give the
    same logits at every position and the same state, bit for bit: every token's products
    are summed in the same order whatever tile it lands in, and the recurrence carries
    the state between chunks in f32. 600 tokens: every chunk of at least 8 tokens (the
    three-pass WKV) and more than 16 (the matrix-matrix kernels)."""
    tokens = [(7 * i + 3) % 512 for i in range(600)]
    runs = {}
    for chunk in ("64", "256", "512"):
        monkeypatch.setenv("RWKV_GPU_CHUNK_TOKENS", chunk)
        model = open_model(DATA / "tiny-rwkv7" / "model.safetensors")
        assert model.config["chunk_tokens"] == int(chunk)
        state = model.new_state()
        logits = model.forward(tokens, state, all_logits=True)
        runs[chunk] = (logits, state.to_numpy())
    for chunk in ("256", "512"):
        np.testing.assert_array_equal(runs[chunk][0], runs["64"][0])
        for name, array in runs["64"][1].items():
            np.testing.assert_array_equal(runs[chunk][1][name], array, err_msg=name)
