"""Speed of each kernel family on the default adapter, through wgpu-py with the exact
WGSL the runtime compiles (rwkv_gpu.kernel_source): matrix-vector and matrix-matrix
products in fp16/int8/nf4, the WKV recurrence, layer norm, the sampler; plus end-to-end pp/tg on a
small random model through rwkv_gpu itself.

    python -m pytest benches/test_kernel_speed.py --benchmark-only
    RWKV_BENCH_C=2560 python -m pytest benches/...      # a 2.9B layer's width

Each kernel benchmark records DISPATCHES dispatches in one compute pass and waits for
them, so submission overhead is amortised; extra_info holds GB/s (bytes each dispatch
must move at least: weights once, activations in and out) and GFLOP/s. Sizes default
to a 1024-wide layer, which lavapipe runs in seconds; on a GPU use the width of the
model you care about. Timings on a software adapter measure a CPU.
"""

from __future__ import annotations

import os
import struct
import warnings

import numpy as np
import pytest

wgpu = pytest.importorskip("wgpu")
import rwkv_gpu  # noqa: E402

C = int(os.environ.get("RWKV_BENCH_C", "1024"))
TOKENS = 64  # a prefill chunk for matmul_tiled
# One format per dispatch, as the runtime compiles a dispatch of one format (variants.rs).
DEFINES = {
    "fp16": ["SINGLE_FORMAT=FMT_F16"],
    "int8": ["HAS_INT8", "SINGLE_FORMAT=FMT_INT8"],
    "nf4": ["HAS_NF4", "SINGLE_FORMAT=FMT_NF4"],
}
DISPATCHES = 8


@pytest.fixture(scope="module")
def device():
    adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    if adapter is None:
        pytest.skip("no WebGPU adapter for wgpu-py")
    return adapter.request_device_sync(required_features=[f for f in ["subgroup"] if f in adapter.features])


class Kernel:
    """One kernel variant bound to its buffers, dispatched DISPATCHES times per call."""

    def __init__(self, device, name, defines, entry, params, arrays, grid):
        code = rwkv_gpu.kernel_source(name, list(defines))
        module = device.create_shader_module(code=code)
        self.pipeline = device.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": entry})
        words = b"".join(struct.pack("<f" if isinstance(v, float) else "<I", v) for v in params)
        words += b"\0" * (max(32, -(-len(words) // 16) * 16) - len(words))
        usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC
        self.uniform = device.create_buffer_with_data(data=words, usage=wgpu.BufferUsage.UNIFORM)
        self.buffers = [device.create_buffer_with_data(data=np.ascontiguousarray(a).tobytes(), usage=usage) for a in arrays]
        entries = [{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}} for i, b in enumerate([self.uniform, *self.buffers])]
        self.group = device.create_bind_group(layout=self.pipeline.get_bind_group_layout(0), entries=entries)
        self.device, self.grid = device, grid

    def __call__(self):
        enc = self.device.create_command_encoder()
        cpass = enc.begin_compute_pass()
        cpass.set_pipeline(self.pipeline)
        cpass.set_bind_group(0, self.group)
        for _ in range(DISPATCHES):
            cpass.dispatch_workgroups(*self.grid)
        cpass.end()
        self.device.queue.submit([enc.finish()])
        self.device.queue.read_buffer(self.buffers[-1], 0, 4)  # waits for the work


def measure(benchmark, kernel, bytes_moved, flops):
    kernel()  # compiles and warms up
    benchmark.pedantic(kernel, rounds=3, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.mean / DISPATCHES
    benchmark.extra_info["GB_per_s"] = bytes_moved / seconds / 1e9
    benchmark.extra_info["GFLOP_per_s"] = flops / seconds / 1e9
    benchmark.extra_info["us_per_dispatch"] = seconds * 1e6


def weights(fmt, m, k, rng):
    """(words, s_off, bytes) of an [m, k] matrix in the device layout of `fmt` (contents
    are random bit patterns of the right size: speed does not depend on them)."""
    code_words = {"fp16": k // 2, "int8": k // 4, "nf4": k // 8}[fmt]
    scale_words = 0 if fmt == "fp16" else -(-k // 128)
    if fmt == "fp16":
        w = rng.standard_normal((m, k)).astype(np.float16).view(np.uint32).reshape(m, code_words)
    else:
        w = rng.integers(0, 2**32, (m, code_words), dtype=np.uint32)
    scales = np.full((m, scale_words), 0x2C002C00, np.uint32)  # f16 pairs of 1/16
    words = np.concatenate([w.ravel(), scales.ravel()])
    return words, m * code_words, words.nbytes


def matmul_kernel(device, entry, fmt, m, k, t):
    """One group [m, k] of `fmt` over t tokens, with the variant the runtime picks
    (src/model/ops.rs): matvec with the smallest token block that holds t (8 beyond)
    and subgroup reductions where the device has them."""
    rng = np.random.default_rng(0)
    w, s_off, w_bytes = weights(fmt, m, k, rng)
    x = rng.standard_normal(t * k).astype(np.float32)
    y = np.zeros(t * m, np.float32)
    code = {"fp16": 0, "int8": 2, "nf4": 3}[fmt]
    defines = DEFINES[fmt]
    if entry == "matvec":
        words = k // {"fp16": 8, "int8": 16, "nf4": 32}[fmt]
        block = next((b for b in (1, 2, 4, 8) if b >= t), 8)
        defines = defines + [f"TOKEN_BLOCK={block}u", f"LANES={64 if words % 64 == 0 else 32}u", "MATVEC_ROWS=8u", "MATVEC_DEPTH=1u"]
        if "subgroup" in device.features:
            defines.append("SUBGROUPS")
    params = [t, 0, 1, 0, m, k, 0, s_off, 0, k, 0, m, code << 8, 0, 0, 0] + [0] * 84  # one group, no activation
    groups = -(-m // 8) if entry == "matvec" else -(-m // 64) * -(-t // 64)
    name = "matmul_vec" if entry == "matvec" else "matmul_mat"
    kernel = Kernel(device, name, defines, entry, params, [w, w, x, y], (groups, 1, 1))
    return kernel, w_bytes + x.nbytes + y.nbytes, 2.0 * m * k * t


@pytest.mark.parametrize("fmt", ["fp16", "int8", "nf4"])
def test_matvec(benchmark, device, fmt):
    """Decode: one token through an ffn-key-sized matrix [4C, C]."""
    kernel, moved, flops = matmul_kernel(device, "matvec", fmt, 4 * C, C, 1)
    measure(benchmark, kernel, moved, flops)


@pytest.mark.parametrize("tokens", [4, 16])
def test_matvec_batch(benchmark, device, tokens):
    """A batch of decode steps: several tokens through [4C, C] fp16 (one weight pass per
    four tokens)."""
    kernel, moved, flops = matmul_kernel(device, "matvec", "fp16", 4 * C, C, tokens)
    measure(benchmark, kernel, moved, flops)


@pytest.mark.parametrize("fmt", ["fp16", "int8", "nf4"])
@pytest.mark.parametrize("zero_groups", [0.0, 0.8])
def test_matvec_sparse(benchmark, device, fmt, zero_groups):
    """Decode through the ffn value [C, 4C], stored input-major, with this share of its
    groups of four inputs zero (0.8: a trained model's, see shaders/matmul_sparse.wgsl).
    GB/s counts the dense bytes, so it shows the saving as speed."""
    m, k = C, 4 * C
    rng = np.random.default_rng(0)
    w, s_off, w_bytes = weights(fmt, k, m, rng)  # stored [k rows, m wide]
    x = rng.standard_normal(k).astype(np.float32)
    x.reshape(-1, 4)[rng.random(k // 4) < zero_groups] = 0.0
    y = np.zeros(m, np.float32)
    code = {"fp16": 0, "int8": 2, "nf4": 3}[fmt]
    defines = DEFINES[fmt] + ["TOKEN_BLOCK=1u"]
    params = [1, 0, 1, 0, m, k, 0, s_off, 0, k, 0, m, 32 | code << 8, 0, 0, 0] + [0] * 84  # INPUT_MAJOR
    kernel = Kernel(device, "matmul_sparse", defines, "matvec_sparse", params, [w, w, x, y], (-(-m // 32), 1, 1))
    measure(benchmark, kernel, w_bytes + x.nbytes + y.nbytes, 2.0 * m * k)


@pytest.mark.parametrize("fmt", ["fp16", "int8", "nf4"])
def test_matmul_tiled(benchmark, device, fmt):
    """Prefill: a chunk of TOKENS tokens through [C, C]."""
    kernel, moved, flops = matmul_kernel(device, "matmul_tiled", fmt, C, C, TOKENS)
    measure(benchmark, kernel, moved, flops)


def wkv7_buffers(tokens):
    """Buffers of the WKV kernels for every head of one sequence (the prefill path:
    second stages precomputed in `lora`), and the Params words."""
    n, h = 64, C // 64
    rng = np.random.default_rng(1)
    rkv = rng.standard_normal((3, tokens, C)).astype(np.float32) * 0.1
    lora = rng.standard_normal((4, tokens, C)).astype(np.float32) * 0.1
    consts = rng.standard_normal(19 * C).astype(np.float32) * 0.1
    seqs = np.array([[0, tokens, 0, 0]], np.uint32)
    v_first = np.zeros((tokens, C), np.float32)
    stride = 2 * C + h * n * n
    state = np.zeros(stride, np.float32)
    out = np.zeros((tokens, C), np.float32)
    offs = [c * C for c in (11, 12, 13, 14, 15, 16, 17, 18)]
    params = [C, tokens, 1, 0, stride, 2 * C, *offs, 64e-5] + [0] * 17
    buffers = dict(proj=rkv, lora=lora, consts=consts, seqs=seqs, v_first=v_first, state=state, out=out)
    moved = 2 * h * n * n * 4 + (rkv.nbytes + lora.nbytes + out.nbytes)
    return buffers, params, moved, 6.0 * h * n * n * tokens


class Chain:
    """WKV passes on shared buffers (named as in shaders/wkv7.wgsl), each dispatched in
    turn, DISPATCHES times per call."""

    def __init__(self, device, buffers, params, stages):
        usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC
        words = b"".join(struct.pack("<f" if isinstance(v, float) else "<I", v) for v in params)
        uniform = device.create_buffer_with_data(data=words, usage=wgpu.BufferUsage.UNIFORM)
        made = {k: device.create_buffer_with_data(data=a.tobytes(), usage=usage) for k, a in buffers.items()}
        self.device, self.out, self.stages = device, made["out"], []
        for defines, entry, names, grid in stages:
            module = device.create_shader_module(code=rwkv_gpu.kernel_source("wkv7", ["HEAD_SIZE=64u", *defines]))
            pipe = device.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": entry})
            entries = [{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}}
                       for i, b in enumerate([uniform, *(made[k] for k in names)])]
            group = device.create_bind_group(layout=pipe.get_bind_group_layout(0), entries=entries)
            self.stages.append((pipe, group, grid))

    def __call__(self):
        enc = self.device.create_command_encoder()
        cpass = enc.begin_compute_pass()
        for _ in range(DISPATCHES):
            for pipe, group, grid in self.stages:
                cpass.set_pipeline(pipe)
                cpass.set_bind_group(0, group)
                cpass.dispatch_workgroups(*grid)
        cpass.end()
        self.device.queue.submit([enc.finish()])
        self.device.queue.read_buffer(self.out, 0, 4)  # waits for the work


@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_wkv7(benchmark, device, tokens):
    """The whole kernel, token after token, for every head of one sequence: the state is
    read and written once per call; per token each head does ~6 N^2 flops."""
    buffers, params, moved, flops = wkv7_buffers(tokens)
    whole = [(["STAGE_WHOLE"], "wkv7", ["proj", "lora", "consts", "seqs", "v_first", "state", "out"], (C // 64, 1, 1))]
    measure(benchmark, Chain(device, buffers, params, whole), moved, flops)


@pytest.mark.parametrize("tokens", [16, 64])
def test_wkv7_three_passes(benchmark, device, tokens):
    """The prefill path for the same work: prepare and finish over (heads, tokens), the
    recurrence over heads with TOKEN_BLOCK = 8 tokens staged at a time."""
    buffers, params, moved, flops = wkv7_buffers(tokens)
    per_token, per_seq = (C // 64, tokens, 1), (C // 64, 1, 1)
    passes = [
        (["STAGE_PREPARE"], "wkv7_prepare", ["proj", "lora", "consts", "v_first"], per_token),
        (["STAGE_RECURRENCE", "TOKEN_BLOCK=8u"], "wkv7_recurrence", ["proj", "lora", "seqs", "state", "out"], per_seq),
        (["STAGE_FINISH"], "wkv7_finish", ["proj", "lora", "consts", "out"], per_token),
    ]
    measure(benchmark, Chain(device, buffers, params, passes), moved, flops)


def test_layer_norm(benchmark, device):
    rows = TOKENS
    rng = np.random.default_rng(2)
    x = rng.standard_normal((rows, C)).astype(np.float32)
    consts = rng.standard_normal(2 * C).astype(np.float32)
    y = np.zeros((rows, C), np.float32)
    kernel = Kernel(device, "layer_norm", [], "layer_norm", [C, rows, 0, 0, C, 1e-5], [x, consts, y], (rows, 1, 1))
    measure(benchmark, kernel, x.nbytes + y.nbytes, 8.0 * rows * C)


def test_ln_shift(benchmark, device):
    """LayerNorm and the time mix's token shift (six mixes) for one chunk of one sequence."""
    rows = TOKENS
    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, C)).astype(np.float32)
    consts = rng.standard_normal(8 * C).astype(np.float32)
    seqs = np.array([[0, rows, 0, 0]], np.uint32)
    state = np.zeros(2 * C, np.float32)
    out = np.zeros((6, rows, C), np.float32)
    kernel = Kernel(device, "ln_shift", ["N_MIX=6u"], "ln_shift", [C, rows, 1, 0, C, 2 * C, 0, 2 * C, 1e-5],
                    [x, consts, seqs, state, out], (rows, 1, 1))
    measure(benchmark, kernel, x.nbytes + out.nbytes, 20.0 * rows * C)


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("top_p", [0.85, 1.0])
def test_sample(benchmark, device, rows, top_p):
    """The device's sampler (shaders/sample.wgsl) over `rows` sequences of a 65536-token
    vocabulary: top_p 0.85 runs the cutoff's radix descent, 1.0 skips it. The kernel
    rewrites its rows (probabilities, then weights), so the dispatches after the first
    draw from those: the same passes over the same bytes. GB/s counts one read of each
    row; us_per_dispatch is what a decode step adds (against reading the rows back)."""
    vocab = 65536
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((rows, vocab)) * 2.5).astype(np.float32)
    draw = [np.float32(0.5).view(np.uint32), np.float32(1.0).view(np.uint32), np.float32(top_p).view(np.uint32), 0, 0, 0, 0, 0]
    draws = np.array([draw] * rows, np.uint32)
    entries = np.zeros((1, 4), np.uint32)
    best = np.zeros((rows, 2), np.uint32)
    kernel = Kernel(device, "sample", [], "sample", [vocab, 0], [logits, draws, entries, best], (1, rows, 1))
    measure(benchmark, kernel, logits.nbytes, 10.0 * logits.size)


@pytest.fixture(scope="module")
def small_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return rwkv_gpu.Model.random(2, 512, vocab_size=4096)


def test_end_to_end_prefill(benchmark, small_model):
    """pp64 on a random 2 x 512 model with a 4096 vocabulary (tokens/s in extra_info)."""
    tokens = list(range(64))
    small_model.forward(tokens, small_model.new_state())
    benchmark.pedantic(lambda: small_model.forward(tokens, small_model.new_state()), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = len(tokens) / benchmark.stats.stats.mean


def test_end_to_end_generation(benchmark, small_model):
    """tg16 with the next token chosen on the device."""
    def run():
        state, token = small_model.new_state(), 1
        for _ in range(16):
            token = small_model.forward_argmax([token], state)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = 16 / benchmark.stats.stats.mean
