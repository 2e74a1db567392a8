"""Each WGSL kernel variant, compiled and run through wgpu-py (a second WebGPU stack:
wgpu-native with its own WGSL front end version, driven from Python with host code
written from the shader headers, not from src/), against NumPy references in float64.

Kernel sources come preprocessed from rwkv_gpu.kernel_source(name, defines), so the
variants tested are exactly the text the Rust side compiles. Sizes are small and odd
(C = 200, M = 37, K = 40, ...) to reach the edge paths of every loop; inputs are
seeded. Dispatch geometry follows src/model/ops.rs.

Tolerances: kernels compute in f32; 16-bit weights are exactly representable in both
f32 and float64, so the only differences are f32 rounding (summation order differs
from NumPy's) and the GPU's exp/tanh/inverseSqrt, a few ULP each: ~1e-6 relative.
Each test states its bound, with ~10x headroom over what it measures on lavapipe.
"""
import functools
import struct

import numpy as np
import pytest

wgpu = pytest.importorskip("wgpu")
rwkv_gpu = pytest.importorskip("rwkv_gpu")

from conftest import assert_same_arithmetic  # noqa: E402
from support.reference import group_norm, l2_normalize, layer_norm, sigmoid, wkv7_step  # noqa: E402

f64 = np.float64


# ---- running a kernel ----

@functools.cache
def device():
    adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    if adapter is None:
        pytest.skip("no WebGPU adapter for wgpu-py")
    # Subgroups and f16 where the adapter has them, so that the SUBGROUPS and the
    # (emulated) cooperative-matrix variants run too.
    wanted = ["subgroup", "shader-f16"]
    return adapter.request_device_sync(required_features=[f for f in wanted if f in adapter.features])


@functools.cache
def pipeline(name, defines, entry):
    dev = device()
    module = dev.create_shader_module(code=rwkv_gpu.kernel_source(name, list(defines)))
    return dev.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": entry})


def run_kernel(name, defines, entry, params, arrays, grid):
    """Binds a Params uniform (ints -> u32, floats -> f32, zero-padded to at least 32 bytes
    and a multiple of 16)
    at binding 0 and `arrays` as storage buffers at 1, 2, ...; dispatches `grid`
    workgroups and returns every storage buffer read back, in the input's dtype/shape."""
    dev = device()
    pipe = pipeline(name, tuple(defines), entry)
    words = [struct.pack("<f" if isinstance(v, float) else "<I", v) for v in params]
    words += [b"\0\0\0\0"] * (max(8, -(-len(words) // 4) * 4) - len(words))
    ubuf = dev.create_buffer_with_data(data=b"".join(words), usage=wgpu.BufferUsage.UNIFORM)
    usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC
    bufs = [dev.create_buffer_with_data(data=np.ascontiguousarray(a).tobytes(), usage=usage) for a in arrays]
    entries = [{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}}
               for i, b in enumerate([ubuf] + bufs)]
    group = dev.create_bind_group(layout=pipe.get_bind_group_layout(0), entries=entries)
    enc = dev.create_command_encoder()
    cpass = enc.begin_compute_pass()
    cpass.set_pipeline(pipe)
    cpass.set_bind_group(0, group)
    cpass.dispatch_workgroups(*grid)
    cpass.end()
    dev.queue.submit([enc.finish()])
    return [np.frombuffer(dev.queue.read_buffer(b), a.dtype).reshape(a.shape) for a, b in zip(arrays, bufs)]


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---- layer_norm: grid (rows, 1, 1), one workgroup of 256 per row ----

# C = 200: fewer channels than threads; 600: several per thread. Grid (2, 2): the host's
# 2-D fold for more than 65535 rows, here with one surplus workgroup that must do nothing.
@pytest.mark.parametrize("c, grid", [(200, (3, 1, 1)), (600, (2, 2, 1))])
def test_layer_norm(c, grid):
    rng = np.random.default_rng(1)
    in_rows, rows, row0, w_off, b_off = 7, 3, 2, 5, 5 + c + 3
    x = rand(rng, in_rows, c, scale=2.0) + 3.0  # nonzero mean: the two-pass path matters
    consts = rand(rng, b_off + c + 4)
    y = np.full((rows + 1, c), -7.0, np.float32)  # one spare row: must stay untouched
    _, _, got = run_kernel("layer_norm", [], "layer_norm", [c, rows, row0, w_off, b_off, 1e-5],
                           [x, consts, y], grid)
    want = layer_norm(x[row0:row0 + rows].astype(f64), consts[w_off:w_off + c], consts[b_off:b_off + c])
    # Outputs are O(1); f32 mean/variance over <= 600 terms: ~1e-6 error.
    np.testing.assert_allclose(got[:rows], want, rtol=1e-5, atol=1e-5)
    assert np.all(got[rows] == -7.0)


def test_layer_norm_gathers_rows_to_an_output_offset():
    """out_row0: the head gathers the last rows of several sequences into consecutive
    rows; rows before out_row0 and after the written ones stay untouched."""
    rng = np.random.default_rng(21)
    c, in_rows, rows, row0, out_row0 = 256, 9, 2, 6, 3
    x = rand(rng, in_rows, c) + 1.0
    consts = rand(rng, 2 * c)
    y = np.full((out_row0 + rows + 1, c), -7.0, np.float32)
    _, _, got = run_kernel("layer_norm", [], "layer_norm", [c, rows, row0, 0, c, 1e-5, out_row0],
                           [x, consts, y], (rows, 1, 1))
    want = layer_norm(x[row0:row0 + rows].astype(f64), consts[:c], consts[c:])
    np.testing.assert_allclose(got[out_row0:out_row0 + rows], want, rtol=1e-5, atol=1e-5)  # as above
    assert np.all(got[:out_row0] == -7.0) and np.all(got[out_row0 + rows] == -7.0)


# ---- ln_shift: grid (T, 1, 1), one workgroup of 256 per token ----

@pytest.mark.parametrize("n_mix", [6, 1])
@pytest.mark.parametrize("c", [100, 600])  # fewer channels than threads; several per thread
def test_ln_shift(n_mix, c):
    """LayerNorm then token shift for two sequences listed out of token order (slots out
    of order too) and a one-token sequence: each sequence's first token takes its slot's
    state as the previous row, its last normalised row becomes the new state."""
    rng = np.random.default_rng(2 + c)
    t_total, slots, state_off, ln_w, ln_b, mix_off = 8, 4, c, 3, 3 + c + 1, 3 + 2 * c + 5
    stride = 2 * c + 8
    seqs = np.array([[3, 4, 0, 0], [0, 3, 2, 0], [7, 1, 3, 0]], np.uint32)
    x = rand(rng, t_total, c, scale=2.0) + 3.0  # nonzero mean: the two-pass path matters
    consts = rand(rng, mix_off + n_mix * c + 5)
    state = rand(rng, slots, stride)
    out = np.full((n_mix, t_total, c), np.nan, np.float32)
    _, _, _, got_state, got = run_kernel(
        "ln_shift", [f"N_MIX={n_mix}u"], "ln_shift",
        [c, t_total, len(seqs), ln_w, ln_b, mix_off, state_off, stride, 1e-5], [x, consts, seqs, state, out],
        (t_total, 1, 1))

    norm = layer_norm(x.astype(f64), consts[ln_w:ln_w + c], consts[ln_b:ln_b + c])
    mix = consts[mix_off:mix_off + n_mix * c].reshape(n_mix, c).astype(f64)
    want, want_state = np.zeros(out.shape), state.astype(f64)
    for first, count, slot, _ in seqs:
        prev = np.concatenate([state[slot, None, state_off:state_off + c], norm[first:first + count - 1]])
        cur = norm[first:first + count]
        want[:, first:first + count] = cur + (prev - cur) * mix[:, None, :]
        want_state[slot, state_off:state_off + c] = norm[first + count - 1]
    # f32 mean/variance over <= 600 terms (~1e-6) and one multiply-add: outputs O(1).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_state, want_state, rtol=1e-5, atol=1e-5)
    untouched = np.ones(stride, bool)
    untouched[state_off:state_off + c] = False
    assert np.array_equal(got_state[:, untouched], state[:, untouched]) and np.array_equal(got_state[1], state[1])


@pytest.mark.parametrize("c", [100, 600])
@pytest.mark.parametrize("parts", [1, 3])
def test_ln_shift_folds_the_parts_of_a_split_product(c, parts):
    """With FOLD (decode after a value projection split along K, src/model/ops.rs Split):
    every token is its sequence's first, and each token's row of x gets the parts added
    in part order and written back before the LayerNorm; the outputs are those of
    ln_shift on the folded x."""
    rng = np.random.default_rng(7 + c + parts)
    t_total, slots, state_off, ln_w, ln_b, mix_off, n_mix = 5, 6, 0, 1, 2 + c, 3 + 2 * c, 6
    stride = c + 4
    fold_stride = t_total * c + 3  # parts need not be packed
    seqs = np.array([[t, 1, (t * 5) % slots, 0] for t in range(t_total)], np.uint32)
    x = rand(rng, t_total, c, scale=2.0) + 3.0
    parts_buf = rand(rng, parts * fold_stride)
    consts = rand(rng, mix_off + n_mix * c + 5)
    state = rand(rng, slots, stride)
    out = np.full((n_mix, t_total, c), np.nan, np.float32)
    got_x, _, _, got_state, got, _ = run_kernel(
        "ln_shift", ["N_MIX=6u", "FOLD"], "ln_shift",
        [c, t_total, len(seqs), ln_w, ln_b, mix_off, state_off, stride, 1e-5, parts, fold_stride],
        [x, consts, seqs, state, out, parts_buf], (t_total, 1, 1))

    # The same additions in the same order in f32: the written-back rows bit for bit.
    folded = x.copy()
    for j in range(parts):
        folded += parts_buf[j * fold_stride:j * fold_stride + t_total * c].reshape(t_total, c)
    assert np.array_equal(got_x, folded)
    norm = layer_norm(folded.astype(f64), consts[ln_w:ln_w + c], consts[ln_b:ln_b + c])
    mix = consts[mix_off:mix_off + n_mix * c].reshape(n_mix, c).astype(f64)
    prev = state[seqs[:, 2], state_off:state_off + c].astype(f64)
    want = norm + (prev - norm) * mix[:, None, :]
    # As test_ln_shift: f32 statistics over <= 600 terms, outputs O(1).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_state[seqs[:, 2], state_off:state_off + c], norm, rtol=1e-5, atol=1e-5)


# ---- matmul_vec / matmul_mat: every group's blocks back to back in a flat grid, matvec
# ceil(M/8) per group, matmul_tiled ceil(M/64) * ceil(T/64). Each group's format is in
# its flags; a variant compiles the formats it names (HAS_BF16, HAS_INT8, HAS_NF4). ----

# Group flags: activation id (bits 0-3), ADD (bit 4), format (bits 8-9), as
# shaders/matmul_common.wgsl.
ACTS = {
    None: (0, lambda v: v),
    "tanh": (1, np.tanh),
    "sigmoid": (2, sigmoid),
    "relu_sq": (3, lambda v: np.maximum(v, 0.0) ** 2),
}
ADD = 16
FORMATS = {"f16": 0, "bf16": 1, "int8": 2, "nf4": 3}
TOKEN_BLOCKS = (1, 2, 4, 8)


def token_block(t):
    """The matvec variant the host picks for t tokens (src/model/ops.rs token_block)."""
    return next((b for b in TOKEN_BLOCKS if b >= t), 8)


def matmul_params(t, groups, count_at=0):
    """The Params words: t, count_at, the group count, padding, then eight groups of (m, k,
    w_off, s_off, x_off, x_stride, y_off, y_stride, flags) and three words of padding,
    unused ones zero."""
    words = [t, count_at, len(groups), 0]
    for g in groups:
        words += [int(v) for v in g] + [0, 0, 0]
    return words + [0] * (12 * (8 - len(groups)))


def matmul_grid(entry, rows, t, fold=False, coop_rows=128, matvec_rows=8):
    """The flat grid: every group's blocks back to back (`rows`: each group's outputs;
    `coop_rows`: matmul_coop's tile, 32 rows per subgroup of the workgroup;
    `matvec_rows`: matvec's rows per workgroup)."""
    tile = {"matvec": (matvec_rows, 1), "matmul_tiled": (64, 64), "matmul_direct": (64, 64), "matmul_coop": (coop_rows, 64)}[entry]
    blocks = sum(-(-m // tile[0]) * -(-t // tile[1]) for m in rows)
    return (3, -(-blocks // 3), 1) if fold else (blocks, 1, 1)  # the host's 2-D fold


KERNEL_FILES = {"matvec": "matmul_vec", "matmul_tiled": "matmul_mat", "matmul_direct": "matmul_mat", "matmul_coop": "matmul_coop"}


@functools.cache
def fixed_subgroup_size():
    """The adapter's subgroup size when it is fixed (so that the test knows how many
    subgroups a workgroup has), else None."""
    if not {"subgroup", "shader-f16"} <= set(device().features):
        return None
    sizes = [a["subgroup_sizes"] for a in rwkv_gpu.adapters() if a["subgroups"]]
    return sizes[0][0] if sizes and sizes[0][0] == sizes[0][1] else None


def coop_defines(subgroups=4):
    """matmul_coop emulated in workgroups of `subgroups` subgroups (4 x SG_MIN threads;
    SG_MIN below the real size stands for a device whose subgroups can be wider)."""
    size = fixed_subgroup_size()
    if size is None or size * 4 // subgroups < 1:
        pytest.skip("the emulated cooperative-matrix kernel needs f16 and subgroups of one size here")
    return [f"SG_MIN={size * subgroups // 4}u", "COOP_EMULATED"]


def f16_round(a):
    """What matmul_coop multiplies: operands rounded to f16."""
    return np.asarray(a).astype(np.float16).astype(f64)


def sample_matrix(rng, m, k):
    w = rand(rng, m, k, scale=k ** -0.5)
    w[:4] *= 20.0  # some large outputs: tanh/sigmoid saturation, relu^2 growth
    if k >= 64 and m > 5:
        w[5, :64] = 0.0  # an all-zero block: scale 0, codes that decode to 0
    return w


def pack_16bit(w, bf16):
    """(packed u32 (M, K/2), exact f64 values (M, K)): 16-bit floats, element 2i low."""
    if bf16:
        halves = (w.view(np.uint32) >> 16).astype(np.uint16)
        exact = (halves.astype(np.uint32) << 16).view(np.float32)
    else:
        halves = w.astype(np.float16).view(np.uint16)
        exact = halves.view(np.float16).astype(np.float32)
    pairs = halves[:, 0::2].astype(np.uint32) | (halves[:, 1::2].astype(np.uint32) << 16)
    return pairs, exact.astype(f64)


def scale_words(scales):
    """f16 [M, blocks] -> u32 [M, ceil(blocks / 2)], even block in the low half."""
    padded = np.pad(scales, ((0, 0), (0, scales.shape[1] % 2)))
    return np.ascontiguousarray(padded).view(np.uint32)


def pack_weights(fmt, rng, m, k):
    """(u32 words as the device holds the matrix, word offset of its scales or None,
    exact f64 values of what the kernel must multiply by)."""
    return pack_weights_of(fmt, sample_matrix(rng, m, k))


def pack_weights_of(fmt, w):
    """As pack_weights, for the matrix `w` as stored (rows of its width)."""
    if fmt in ("f16", "bf16"):
        packed, exact = pack_16bit(w, fmt == "bf16")
        return packed.ravel(), None, exact
    from support import quant_reference as qr
    w16 = w.astype(np.float16).astype(np.float32)
    if fmt == "int8":
        codes, scales, _ = qr.quantize_int8(w16, block=64)
        deq = qr.dequantize_int8(codes, scales)
    else:
        codes, scales = qr.quantize_nf4(w16)
        deq = qr.dequantize_nf4(codes, scales)
    return np.concatenate([codes.ravel(), scale_words(scales).ravel()]), codes.size, deq.astype(f64)


def matmul_defines(entry, formats, t, tokens=None, subgroups=False, lanes=64, nf4_select=False, coop_subgroups=4,
                   compiled=None, matvec_rows=8, matvec_depth=1):
    """As variants.rs: code for each format in `compiled` (default: those used), and one
    format alone a constant."""
    compiled = set(compiled or formats)
    defines = [f"HAS_{f.upper()}" for f in sorted(compiled) if f != "f16"]
    if len(compiled) == 1:
        defines.append(f"SINGLE_FORMAT=FMT_{formats[0].upper()}")
    if nf4_select and "nf4" in formats:
        defines.append("NF4_SELECT")
    if entry == "matvec":
        defines.append(f"TOKEN_BLOCK={tokens or token_block(t)}u")
        defines.append(f"LANES={lanes}u")
        defines.append(f"MATVEC_ROWS={matvec_rows}u")
        defines.append(f"MATVEC_DEPTH={matvec_depth}u")
        if subgroups:
            defines.append("SUBGROUPS")
    if entry == "matmul_coop":
        defines += coop_defines(coop_subgroups)
    return defines


def check_matmul_groups(entry, specs, t, seed, tokens=None, subgroups=False, fold=False, lanes=64, nf4_select=False,
                        coop_subgroups=4, compiled=None, matvec_rows=8, matvec_depth=1):
    """Runs one dispatch over len(specs) matrices (m, k, act, add, format) held back to
    back in one weight buffer (after 4 unused words; each starting on 16 bytes), each
    reading its own window of x and writing its own window of y; returns (got, want)."""
    rng = np.random.default_rng(seed)
    words, groups, exact = [np.full(4, 0xDEADBEEF, np.uint32)], [], []
    w_at, x_at, y_at = 4, 8, 3
    for m, k, act, add, fmt in specs:
        packed, s_off, w_exact = pack_weights(fmt, rng, m, k)
        packed = np.concatenate([packed, np.full(-len(packed) % 4, 0xDEADBEEF, np.uint32)])
        y_stride = m + 6
        flags = ACTS[act][0] | (ADD if add else 0) | FORMATS[fmt] << 8
        groups.append((m, k, w_at, w_at + (s_off or 0), x_at, k, y_at + 2, y_stride, flags))
        words.append(packed)
        exact.append(w_exact)
        w_at += packed.size
        x_at += t * k + 8
        y_at += t * y_stride + 5
    x = rand(rng, x_at + 4)
    y = rand(rng, y_at + 2)  # ADD accumulates into it; others overwrite
    w = np.concatenate(words)
    defines = matmul_defines(entry, [spec[4] for spec in specs], t, tokens, subgroups, lanes, nf4_select, coop_subgroups,
                             compiled, matvec_rows, matvec_depth)
    grid = matmul_grid(entry, [spec[0] for spec in specs], t, fold, coop_rows=32 * coop_subgroups,
                       matvec_rows=matvec_rows)
    _, _, _, got = run_kernel(KERNEL_FILES[entry], defines, entry, matmul_params(t, groups), [w, w, x, y], grid)

    want = y.astype(f64)
    operands = f16_round if entry == "matmul_coop" else (lambda a: a.astype(f64))
    for (m, k, _w_off, _s_off, x_off, _x_stride, y_off, y_stride, _flags), (_, _, act, add, _), w_exact in zip(groups, specs, exact):
        view = want[y_off:y_off + t * y_stride].reshape(t, y_stride)[:, :m]  # a view
        v = operands(x[x_off:x_off + t * k].reshape(t, k)) @ operands(w_exact).T
        view[...] = (view if add else 0.0) + ACTS[act][1](v)
    return got, want


# Dot products of K f32 terms of size ~1 (rows 0-3: ~20), summed in another order: ~1e-6
# relative; relu^2 doubles it. Dequantized weights are exact in f32 (int8: a 7-bit code
# times an f16; nf4: one f32 product, ~6e-8 relative). Everything outside the groups'
# output blocks: exact (a stray write would show).
MATMUL_TOL = dict(rtol=2e-5, atol=2e-5)


def check_matmul(entry, m, k, t, seed, act=None, add=False, fmt="f16", fold=False, **kw):
    got, want = check_matmul_groups(entry, [(m, k, act, add, fmt)], t, seed, fold=fold, **kw)
    np.testing.assert_allclose(got, want, **MATMUL_TOL, err_msg=f"{entry} m={m} k={k} t={t} {act} add={add} {fmt} {kw}")


ENTRIES = ["matvec", "matmul_tiled", "matmul_direct"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("t", [1, 3, 5, 9, 70])  # 9: two passes of 8 tokens in matvec
@pytest.mark.parametrize("k", [8, 40, 96, 520])  # 520: more vec4s per row than lanes; 40: partial K step
def test_matmul_shapes(entry, t, k):
    check_matmul(entry, 37, k, t, seed=t * 1000 + k)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("act", list(ACTS))
def test_matmul_variants(entry, fmt, add, act):
    check_matmul(entry, 37, 40, 5, seed=7, act=act, add=add, fmt=fmt)


@pytest.mark.parametrize("tokens", TOKEN_BLOCKS)
@pytest.mark.parametrize("t", [1, 3, 9])  # fewer tokens than the block (clamped), more (passes)
@pytest.mark.parametrize("subgroups", [False, True])
@pytest.mark.parametrize("lanes", [8, 32, 64, 128])  # 8: CPU devices (MatvecLanes::Narrow); 128: Widest
@pytest.mark.parametrize("rows", [8, 4])
def test_matvec_token_blocks_lanes_rows_and_reductions(tokens, t, subgroups, lanes, rows):
    if subgroups and "subgroup" not in device().features:
        pytest.skip("the adapter has no subgroup operations")
    # K = 776: 97 vec4s per row, more than any lane count and a multiple of none; M = 21:
    # the last workgroup's rows partly past the matrix under either row count.
    check_matmul("matvec", 21, 776, t, seed=tokens * 10 + t, tokens=tokens, subgroups=subgroups, add=True, lanes=lanes,
                 matvec_rows=rows)


def assert_setting_keeps_arithmetic(specs, setting, values, lanes_list, seed):
    """The matvec under each value of one tuning setting (a check_matmul_groups keyword)
    gives the dense product within MATMUL_TOL and agrees with the first value as the
    same arithmetic does (conftest.assert_same_arithmetic), at every lane count in
    lanes_list, with the tree reduction and, where the adapter has subgroups, subgroupAdd."""
    reductions = [False, True] if "subgroup" in device().features else [False]
    for lanes in lanes_list:
        for subgroups in reductions:
            first = None
            for value in values:
                got, want = check_matmul_groups("matvec", specs, 3, seed=seed, subgroups=subgroups, lanes=lanes,
                                                **{setting: value})
                where = f"lanes={lanes} subgroups={subgroups} {setting}={value}"
                np.testing.assert_allclose(got, want, **MATMUL_TOL, err_msg=where)
                if first is None:
                    first = got
                else:
                    assert_same_arithmetic(first, got, err_msg=where)


@pytest.mark.parametrize("fmt", ["f16", "int8", "nf4"])
def test_matvec_rows_per_workgroup_do_the_same_arithmetic(fmt):
    """A row's sums do not depend on how many rows its workgroup holds, so the tuner may
    pick 4 or 8 rows without changing outputs: the two variants agree as the same
    arithmetic does (conftest.assert_same_arithmetic; on lavapipe, to the bit) and give
    the dense product within MATMUL_TOL, for every format, at 8, 64 and 128 lanes with
    the tree reduction and, where the adapter has subgroups, with subgroupAdd."""
    specs = [(37, 576, None, True, fmt), (12, 64, "tanh", False, "f16")]  # K: 72 f16 vec4s, 36 int8, 18 nf4
    assert_setting_keeps_arithmetic(specs, "matvec_rows", (8, 4), lanes_list=(8, 64, 128), seed=5)


@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("lanes", [8, 64, 128])
@pytest.mark.parametrize("rows", [8, 4])
@pytest.mark.parametrize("k", [8, 776, 1032])
def test_matvec_two_steps_deep(tokens, lanes, rows, k):
    """Depth 2 (each thread loads its second step before it adds the first) gives the
    dense product. K in fp16 vec4s: 8 (1: every thread's second step past the row,
    clamped and not added); 776 (97: at 8 lanes six iterations of two steps and a last
    with one step for thread 0; at 64 lanes two steps for threads 0-32, one for the
    rest; at 128 lanes no second step); 1032 (129: at 64 lanes one whole iteration and
    one step past it; at 128 lanes two steps for thread 0 only). M = 21, rows past the
    matrix in the last workgroup; 9 tokens, so a block of 8 runs two passes."""
    reductions = [False, True] if "subgroup" in device().features else [False]
    for subgroups in reductions:
        check_matmul("matvec", 21, k, 9, seed=k + tokens, tokens=tokens, subgroups=subgroups, add=True, lanes=lanes,
                     matvec_rows=rows, matvec_depth=2)


@pytest.mark.parametrize("fmt", ["f16", "int8", "nf4"])
def test_matvec_depths_do_the_same_arithmetic(fmt):
    """Each thread adds its steps in the same order at depth 1 and 2 (only when the loads
    are issued differs), so the tuner may pick either without changing outputs: the two
    agree as the same arithmetic does (conftest.assert_same_arithmetic) and give the
    dense product within MATMUL_TOL, for every format, with a mixed-format dispatch (the
    quantized format beside f16, as the time mix runs them) at 8 and 64 lanes."""
    # K: 1000 f16 = 125 vec4s (at 8 lanes seven iterations of two steps, then two for
    # threads 0-4 and one for the rest; at 64 lanes two steps for threads 0-60). 576 int8
    # = 36 vec4s, nf4 = 18: second steps at 8 lanes only (at 64, fewer vec4s than lanes).
    specs = [(37, 1000, None, True, fmt), (12, 64, "tanh", False, "f16")]
    if fmt != "f16":
        specs[0] = (37, 576, None, True, fmt)
    assert_setting_keeps_arithmetic(specs, "matvec_depth", (1, 2), lanes_list=(8, 64), seed=6)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("m, fold", [(128, False), (130, True)])  # 2 or 3 x 2 tiles of 64x64
def test_matmul_several_tiles(entry, m, fold):
    check_matmul(entry, m, 48, 70, seed=8, add=True, fold=fold)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("t", [1, 5, 70])
def test_matmul_eight_groups_of_mixed_formats_in_one_dispatch(entry, t):
    """r, k, v (quantized) beside the low-rank first stages (f16, tanh / sigmoid) in one
    dispatch, as the time mix runs them: every group finds its codes, scales and format,
    and its blocks after those of the groups before it in the flat grid; the fold's
    surplus workgroups do nothing."""
    specs = [(130, 64, None, False, "int8"), (37, 128, None, True, "nf4"), (64, 192, "relu_sq", False, "int8"),
             (5, 8, "tanh", False, "f16"), (40, 40, None, True, "bf16"), (9, 64, "sigmoid", False, "nf4"),
             (16, 96, None, False, "f16"), (3, 520, "relu_sq", True, "f16")]
    for subgroups in ([False, True] if entry == "matvec" and "subgroup" in device().features else [False]):
        shapes = [(8, 8, 1), (32, 8, 2), (64, 8, 1), (128, 4, 2)] if entry == "matvec" else [(64, 8, 1)]
        for lanes, rows, depth in shapes:
            got, want = check_matmul_groups(entry, specs, t, seed=11, subgroups=subgroups, fold=True, lanes=lanes,
                                            matvec_rows=rows, matvec_depth=depth)
            np.testing.assert_allclose(got, want, **MATMUL_TOL,
                                       err_msg=f"{entry} t={t} subgroups={subgroups} lanes={lanes} rows={rows} "
                                               f"depth={depth}")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("t", [1, 9, 70])
def test_nf4_by_select_equals_the_table(entry, t):
    """NF4_SELECT (CPU devices) decodes every code to the table's value: the mixed-format
    dispatch above with NF4 decoded by the select tree does the table's arithmetic, and
    gives the expected product."""
    specs = [(37, 128, None, True, "nf4"), (130, 64, None, False, "int8"), (9, 64, "sigmoid", False, "nf4"),
             (16, 96, None, False, "f16")]
    table, want = check_matmul_groups(entry, specs, t, seed=12)
    select, _ = check_matmul_groups(entry, specs, t, seed=12, nf4_select=True)
    assert_same_arithmetic(select, table)
    np.testing.assert_allclose(select, want, **MATMUL_TOL)


@pytest.mark.parametrize("entry", ["matvec_sparse", "matmul_tiled", "matmul_direct"])
def test_nf4_by_select_input_major(entry):
    """The same for input-major NF4 (sparse decode and the prefill GEMM)."""
    t = 3 if entry == "matvec_sparse" else 70
    table, want, _, _ = check_input_major(entry, 128, 200, t, "nf4", "sparse", seed=5)
    select, _, _, _ = check_input_major(entry, 128, 200, t, "nf4", "sparse", seed=5, nf4_select=True)
    assert_same_arithmetic(select, table)
    np.testing.assert_allclose(select, want, **MATMUL_TOL)


# ---- matmul_sparse (and matmul_tiled) on input-major matrices: stored [K rows, M wide]
# (flag INPUT_MAJOR, bit 5), quantized blocks along M; matvec_sparse grid ceil(M/32). ----

INPUT_MAJOR = 32


def sparse_inputs(rng, t, k, pattern):
    """(T, K) inputs: "dense", "zero" (all), or "sparse": 80% of the groups of four zero
    for every token, and some groups zero for some tokens only (live for the pass)."""
    x = rand(rng, t, k)
    if pattern == "zero":
        x[:] = 0.0
    elif pattern == "sparse":
        groups = x.reshape(t, k // 4, 4)
        groups[:, rng.random(k // 4) < 0.8] = 0.0
        groups[rng.random((t, k // 4)) < 0.3] = 0.0
        x[:, 5] = 0.0  # a zero inside a live group
    return x


def check_input_major(entry, m, k, t, fmt, pattern, seed, tokens=None, chunk=None, count=False, act=None, add=True,
                      nf4_select=False):
    """One input-major group W [m, k] (stored W.T) over t tokens; with `chunk` = (k0,
    rows), only inputs k0 .. k0 + rows (the host's chunk of a matrix split across
    bindings: x_off moves, x_stride stays K). Returns (got, want, counts, want_counts)."""
    rng = np.random.default_rng(seed)
    w_logical = sample_matrix(rng, m, k)
    k0, rows = chunk or (0, k)
    packed, s_off, stored_exact = pack_weights_of(fmt, np.ascontiguousarray(w_logical.T[k0:k0 + rows]))
    w = np.concatenate([np.full(4, 0xDEADBEEF, np.uint32), packed, np.full(-len(packed) % 4 + 4, 0xDEADBEEF, np.uint32)])
    x_lead, y_off, y_stride = 8, 3, m + 5
    xs = sparse_inputs(rng, t, k, pattern)
    x = np.concatenate([rand(rng, x_lead), xs.ravel(), rand(rng, 4)]).astype(np.float32)
    y = rand(rng, y_off + t * y_stride + 2)
    flags = ACTS[act][0] | (ADD if add else 0) | INPUT_MAJOR | FORMATS[fmt] << 8
    group = (m, rows, 4, 4 + (s_off or 0), x_lead + k0, k, y_off, y_stride, flags)
    counts = np.zeros(8, np.uint32)
    if entry == "matvec_sparse":
        defines = matmul_defines(entry, [fmt], t, nf4_select=nf4_select) + [f"TOKEN_BLOCK={tokens or token_block(t)}u"] + ["COUNT_READS"] * count
        arrays = [w, w, x, y] + [counts] * count
        out = run_kernel("matmul_sparse", defines, entry, matmul_params(t, [group], count_at=4), arrays, (-(-m // 32), 1, 1))
        got, got_counts = out[3], (out[4] if count else None)
    else:
        defines = matmul_defines(entry, [fmt], t, nf4_select=nf4_select) + ["INPUT_MAJOR_W"]
        got = run_kernel(KERNEL_FILES[entry], defines, entry, matmul_params(t, [group]), [w, w, x, y],
                         matmul_grid(entry, [m], t))[3]
        got_counts = None
    want = y.astype(f64)
    view = want[y_off:y_off + t * y_stride].reshape(t, y_stride)[:, :m]
    operands = f16_round if entry == "matmul_coop" else (lambda a: a.astype(f64))
    v = operands(xs[:, k0:k0 + rows]) @ operands(stored_exact)
    view[...] = (view if add else 0.0) + ACTS[act][1](v)
    # What the counting variant must report: per pass of TOKENS tokens (clamped to the
    # last), each group of four is read when any token of the pass has a non-zero in it.
    block = tokens or token_block(t)
    live = xs[:, k0:k0 + rows].reshape(t, rows // 4, 4) != 0
    passes = [live[[min(p + i, t - 1) for i in range(block)]] for p in range(0, t, block)]
    want_counts = np.array([0, 0, 0, 0, sum(int(q.any(axis=(0, 2)).sum()) for q in passes), len(passes) * (rows // 4),
                            int(live.sum()), t * rows], np.uint32)
    return got, want, got_counts, want_counts


@pytest.mark.parametrize("pattern", ["dense", "sparse", "zero"])
@pytest.mark.parametrize("t", [1, 3, 9])  # a block, clamped tokens, two passes
@pytest.mark.parametrize("fmt", ["f16", "bf16", "int8", "nf4"])
def test_matvec_sparse_against_the_dense_product(pattern, t, fmt):
    """Skipped groups change nothing: the product of the inputs with the weights, for
    dense, sparse and all-zero inputs. M = 40 (fp16; a partial workgroup of 32 outputs)
    or 128 (quantized: blocks of 64 along M); K = 776: 194 groups of four, more than the
    64 threads along K and a multiple of neither."""
    m = 40 if fmt in ("f16", "bf16") else 128
    got, want, _, _ = check_input_major("matvec_sparse", m, 776, t, fmt, pattern, seed=t * 7 + len(pattern))
    np.testing.assert_allclose(got, want, **MATMUL_TOL, err_msg=f"{fmt} t={t} {pattern}")


@pytest.mark.parametrize("tokens", TOKEN_BLOCKS)
@pytest.mark.parametrize("t", [1, 5, 16])
def test_matvec_sparse_counts_the_groups_it_reads(tokens, t):
    """The counting variant (profiles) reports exactly the groups of four it read and
    saw, and the non-zero inputs, per pass of `tokens` tokens; its product is the same."""
    got, want, counts, want_counts = check_input_major("matvec_sparse", 64, 264, t, "f16", "sparse", seed=tokens + 100 * t,
                                                       tokens=tokens, count=True)
    np.testing.assert_allclose(got, want, **MATMUL_TOL)
    np.testing.assert_array_equal(counts, want_counts)


@pytest.mark.parametrize("entry", ["matvec_sparse", "matmul_tiled", "matmul_direct"])
@pytest.mark.parametrize("fmt", ["f16", "int8"])
def test_input_major_chunk_of_the_inputs(entry, fmt):
    """A chunk of an input-major matrix (inputs 128 .. 256 of 384, as the loader cuts one
    larger than a binding) reads its inputs from x_off with the whole row's stride and adds
    its part into y."""
    got, want, _, _ = check_input_major(entry, 64, 384, 5 if entry == "matvec_sparse" else 70, fmt, "sparse", seed=3,
                                        chunk=(128, 128))
    np.testing.assert_allclose(got, want, **MATMUL_TOL)


@pytest.mark.parametrize("entry", ["matmul_tiled", "matmul_direct"])
@pytest.mark.parametrize("fmt", ["f16", "bf16", "int8", "nf4"])
@pytest.mark.parametrize("t", [17, 70])
def test_matmul_tiled_reads_input_major_weights(entry, fmt, t):
    """Prefill keeps the tiled GEMM for the input-major value projection: the same product
    from weights stored [K, M] (M = 136: a partial tile; quantized 128 with blocks along M)."""
    m = 136 if fmt in ("f16", "bf16") else 128
    got, want, _, _ = check_input_major(entry, m, 200, t, fmt, "dense", seed=t, act="relu_sq", add=False)
    np.testing.assert_allclose(got, want, **MATMUL_TOL, err_msg=f"{entry} {fmt} t={t}")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("fmt", ["f16", "bf16", "int8", "nf4"])
def test_one_format_variant_equals_the_mixed_one_bit_for_bit(entry, fmt):
    """A dispatch of one format compiles it as a constant (SINGLE_FORMAT); a variant
    with every format's code, branching per group, does the same arithmetic for it."""
    specs = [(70, 128, None, False, fmt), (9, 192, "sigmoid", True, fmt)]
    single, want = check_matmul_groups(entry, specs, 11, seed=3, nf4_select=fmt == "nf4")
    mixed, _ = check_matmul_groups(entry, specs, 11, seed=3, nf4_select=fmt == "nf4",
                                   compiled=["f16", "bf16", "int8", "nf4"])
    np.testing.assert_allclose(single, want, **MATMUL_TOL)
    assert_same_arithmetic(mixed, single)


@pytest.mark.parametrize("input_major", [False, True])
def test_direct_loads_do_the_staged_arithmetic(input_major):
    """matmul_direct multiplies the same dequantized values in the same order as
    matmul_tiled, so the device-type choice between them changes no output beyond a
    driver's fusing (conftest.assert_same_arithmetic)."""
    if input_major:
        outs = [check_input_major(e, 136 if fmt == "f16" else 128, 200, 70, fmt, "dense", seed=9, act="relu_sq", add=True)[0]
                for fmt in ("f16", "int8", "nf4") for e in ("matmul_tiled", "matmul_direct")]
        pairs = list(zip(outs[0::2], outs[1::2]))
    else:
        specs = [(130, 64, None, False, "int8"), (37, 128, None, True, "nf4"), (5, 8, "tanh", False, "f16"),
                 (40, 40, None, True, "bf16"), (3, 520, "relu_sq", True, "f16")]
        pairs = [(check_matmul_groups("matmul_tiled", specs, 70, seed=5)[0], check_matmul_groups("matmul_direct", specs, 70, seed=5)[0])]
    for tiled, direct in pairs:
        assert_same_arithmetic(direct, tiled)



# ---- matmul_coop (cooperative matrices), emulated: the kernel's staging, tiling and
# stores with the matrix operations done by the subgroup's lanes (COOP_EMULATED), against
# the product of the operands rounded to f16, as the real operations multiply them. The
# emulation sums each 16-term block in order and the blocks in K order, in f32: ~1e-6
# relative from NumPy's float64, as for the SIMT kernels (MATMUL_TOL). ----

@pytest.mark.parametrize("t", [5, 17, 70])  # 70: a full and a partial tile of 64 tokens
@pytest.mark.parametrize("k", [8, 40, 520])  # 8 and 40: partial K steps of 16
@pytest.mark.parametrize("m", [37, 130])  # 130: a second tile of 128 rows
def test_matmul_coop_shapes(m, k, t):
    check_matmul("matmul_coop", m, k, t, seed=m * 10_000 + t * 1000 + k, add=True)


@pytest.mark.parametrize("subgroups", [1, 2])
def test_matmul_coop_with_wider_subgroups(subgroups):
    """Where the driver runs subgroups wider than the narrowest (AMD: 32 to 64 lanes), a
    workgroup has 2 (or 1) of them and a tile of 64 (32) rows; the grid is sized for
    that, and the same products come out."""
    for m, k, t in [(37, 40, 70), (130, 520, 17)]:
        got, want = check_matmul_groups("matmul_coop", [(m, k, None, True, "f16")], t, seed=m + t, coop_subgroups=subgroups)
        np.testing.assert_allclose(got, want, **MATMUL_TOL, err_msg=f"m={m} k={k} t={t} subgroups={subgroups}")


@pytest.mark.parametrize("fmt", ["f16", "int8", "nf4"])
@pytest.mark.parametrize("act", list(ACTS))
def test_matmul_coop_formats_and_activations(fmt, act):
    check_matmul("matmul_coop", 70, 192, 20, seed=len(fmt) + 31 * ACTS[act][0], act=act, fmt=fmt, fold=True)


def test_matmul_coop_eight_groups_of_mixed_formats_in_one_dispatch():
    specs = [(130, 64, None, False, "int8"), (37, 128, None, True, "nf4"), (64, 192, "relu_sq", False, "int8"),
             (5, 8, "tanh", False, "f16"), (40, 40, None, True, "f16"), (9, 64, "sigmoid", False, "nf4"),
             (16, 96, None, False, "f16"), (3, 520, "relu_sq", True, "f16")]
    got, want = check_matmul_groups("matmul_coop", specs, 70, seed=12, fold=True)
    np.testing.assert_allclose(got, want, **MATMUL_TOL)


@pytest.mark.parametrize("fmt", ["f16", "int8", "nf4"])
@pytest.mark.parametrize("t", [17, 70])
def test_matmul_coop_reads_input_major_weights(fmt, t):
    m = 136 if fmt == "f16" else 128
    got, want, _, _ = check_input_major("matmul_coop", m, 200, t, fmt, "dense", seed=t + 1, act="relu_sq", add=False)
    np.testing.assert_allclose(got, want, **MATMUL_TOL, err_msg=f"{fmt} t={t}")


def test_matmul_coop_input_major_chunk_of_the_inputs():
    got, want, _, _ = check_input_major("matmul_coop", 64, 384, 70, "int8", "sparse", seed=4, chunk=(128, 128))
    np.testing.assert_allclose(got, want, **MATMUL_TOL)

# ---- wkv7: grid (n_head, n_seq, 1), HEAD_SIZE threads per workgroup ----

def wkv7_reference(n, h, rkv, lora, consts, off, seqs, v_first, state, stride, wkv_off, first_layer, eps):
    """The per-token math of the shaders/wkv7.wgsl header, in float64."""
    c = n * h
    vec = {name: consts[o:o + c].astype(f64) for name, o in off.items()}
    r_all, k_all, v_all = rkv.astype(f64)
    lw, la, lv, lg = lora.astype(f64)
    out, vf, st = np.zeros((rkv.shape[1], c)), v_first.astype(f64), state.astype(f64)
    heads = lambda a: a.reshape(h, n)
    for first, count, slot, _ in seqs:
        at = slice(slot * stride + wkv_off, slot * stride + wkv_off + h * n * n)
        S = st[at].reshape(h, n, n)  # (head, value i, key j)
        for t in range(first, first + count):
            r, k, v = r_all[t], k_all[t], v_all[t]
            w = np.exp(-np.exp(-0.5) * sigmoid(vec["w0"] + lw[t]))
            a = sigmoid(vec["a0"] + la[t])
            kk = l2_normalize(heads(k * vec["k_k"])).reshape(-1)
            k = k * (1 + (a - 1) * vec["k_a"])
            if first_layer:
                vf[t] = v
            else:
                v = v + (vf[t] - v) * sigmoid(vec["v0"] + lv[t])
            S, y = wkv7_step(S, heads(r), heads(w), heads(k), heads(v), heads(kk), heads(a))
            bonus = (heads(r) * heads(k) * heads(vec["r_k"])).sum(-1, keepdims=True)
            yn = group_norm(y.reshape(-1), vec["lnx_w"], vec["lnx_b"], h, eps)
            out[t] = (yn + (bonus * heads(v)).reshape(-1)) * lg[t]
        st[at] = S.reshape(-1)
    return out, vf, st


@pytest.mark.parametrize("n", [64, 32])
@pytest.mark.parametrize("first_layer", [0, 1])
@pytest.mark.parametrize("fused", [False, True])
def test_wkv7(n, first_layer, fused):
    """Two sequences (slots out of order, one slot unused). `fused`: the low-rank second
    stages computed in the kernel from the hidden values in proj and f16 matrices in a
    weights buffer (v's width 0 in block 0), against the same products in float64."""
    rng = np.random.default_rng(10 + n + first_layer + 2 * fused)
    h, t_total, slots, eps = 2, 5, 3, 64e-5
    c = h * n
    wkv_off = 2 * c
    stride = wkv_off + h * n * n + 4
    names = ["w0", "a0", "v0", "k_k", "k_a", "r_k", "lnx_w", "lnx_b"]
    order = rng.permutation(len(names))  # vectors at shuffled, padded offsets
    off = {name: 3 + int(order[i]) * (c + 1) for i, name in enumerate(names)}
    consts = rand(rng, 3 + len(names) * (c + 1))
    seqs = np.array([[2, 3, 2, 0], [0, 2, 0, 0]], np.uint32)  # slot 1 is unused
    rkv = rand(rng, 3, t_total, c)
    v_first, state = rand(rng, t_total, c), rand(rng, slots * stride, scale=0.3)  # flat
    out = np.full((t_total, c), np.nan, np.float32)
    offs = [off[name] for name in names]
    lora_k, lora_mid, lora_w = [0] * 4, [0] * 4, [0] * 4
    if fused:
        widths = [16, 8, 0 if first_layer else 24, 40]
        mid_off = 3 * t_total * c + 4
        blocks, words, lora = [], [np.zeros(4, np.uint32)], np.zeros((4, t_total, c), np.float32)
        at_mid, at_word = 0, 4
        for i, d in enumerate(widths):
            hidden = rand(rng, t_total, d)
            packed, exact = pack_16bit(rand(rng, c, d, scale=0.3), False)
            lora[i] = hidden.astype(f64) @ exact.T
            lora_k[i], lora_mid[i], lora_w[i] = d, at_mid, at_word
            blocks.append(hidden.ravel())
            words.append(packed.ravel())
            at_mid += hidden.size + 4
            at_word += packed.size
            blocks.append(np.zeros(4, np.float32))
        proj = np.concatenate([rkv.ravel(), np.zeros(4, np.float32), *blocks])
        second = np.concatenate(words)
        variant = [f"HEAD_SIZE={n}u", "STAGE_WHOLE", "FUSED_LORA"]
    else:
        mid_off = 0
        proj, lora = rkv.ravel(), rand(rng, 4, t_total, c)
        second, variant = lora, [f"HEAD_SIZE={n}u", "STAGE_WHOLE"]
    params = [c, t_total, len(seqs), first_layer, stride, wkv_off, *offs, eps, mid_off, 0, 0, 0, 0, *lora_k, *lora_mid, *lora_w]
    _, _, _, _, got_vf, got_state, got = run_kernel(
        "wkv7", variant, "wkv7", params, [proj, second, consts, seqs, v_first, state, out], (h, len(seqs), 1))

    want, want_vf, want_state = wkv7_reference(n, h, rkv, lora, consts, off, seqs, v_first, state,
                                               stride, wkv_off, first_layer, eps)
    # A few tokens of f32 state updates (N-term dots) and GPU exp/inverseSqrt: ~1e-6
    # relative; GroupNorm divides by each head's std of y (O(1) here). Fused: dots of
    # <= 40 f32 terms more. Measured on lavapipe: state <= 4e-6, out <= 2.3e-5 (fused).
    np.testing.assert_allclose(got_state, want_state, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got_vf, want_vf.astype(np.float32))  # copied or untouched: exact


def wkv7_token_block(n):
    """Tokens the recurrence stages at once (wkv_token_block in src/gpu/variants.rs)."""
    return min(max(512 // n, 1), 16)


@pytest.mark.parametrize("n", [64, 32])
@pytest.mark.parametrize("first_layer", [0, 1])
def test_wkv7_in_three_passes(n, first_layer):
    """The prefill path: wkv7_prepare and wkv7_finish over (heads, tokens), and
    wkv7_recurrence over (heads, sequences), chained on the same buffers as the host
    chains them. Two sequences, slots out of order: one of two token blocks and a
    partial third (2 * block + 3 tokens), one shorter than a block."""
    rng = np.random.default_rng(30 + n + first_layer)
    block = wkv7_token_block(n)
    h, slots, eps = 2, 3, 64e-5
    long, short = 2 * block + 3, 5
    t_total = long + short
    c = h * n
    wkv_off = 2 * c
    stride = wkv_off + h * n * n + 4
    names = ["w0", "a0", "v0", "k_k", "k_a", "r_k", "lnx_w", "lnx_b"]
    order = rng.permutation(len(names))
    off = {name: 3 + int(order[i]) * (c + 1) for i, name in enumerate(names)}
    consts = rand(rng, 3 + len(names) * (c + 1))
    seqs = np.array([[short, long, 2, 0], [0, short, 0, 0]], np.uint32)  # slot 1 is unused
    rkv, lora = rand(rng, 3, t_total, c), rand(rng, 4, t_total, c)
    v_first, state = rand(rng, t_total, c), rand(rng, slots * stride, scale=0.3)
    out = np.full((t_total, c), np.nan, np.float32)
    params = [c, t_total, len(seqs), first_layer, stride, wkv_off, *[off[name] for name in names], eps,
              *[0] * 17]
    size = f"HEAD_SIZE={n}u"

    proj, lora_out, _, got_vf = run_kernel(
        "wkv7", [size, "STAGE_PREPARE"], "wkv7_prepare", params, [rkv, lora, consts, v_first], (h, t_total, 1))
    _, _, _, got_state, y = run_kernel(
        "wkv7", [size, "STAGE_RECURRENCE", f"TOKEN_BLOCK={block}u"], "wkv7_recurrence", params,
        [proj, lora_out, seqs, state, out], (h, len(seqs), 1))
    *_, got = run_kernel("wkv7", [size, "STAGE_FINISH"], "wkv7_finish", params, [proj, lora_out, consts, y],
                         (h, t_total, 1))

    want, want_vf, want_state = wkv7_reference(n, h, rkv, lora, consts, off, seqs, v_first, state,
                                               stride, wkv_off, first_layer, eps)
    # As test_wkv7, over up to 2 * 16 + 3 = 35 tokens of f32 state updates: the state's
    # error grows with the tokens (decays < 1 keep it bounded). Measured on lavapipe:
    # state <= 9e-6, out <= 1.2e-5.
    np.testing.assert_allclose(got_state, want_state, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got_vf, want_vf.astype(np.float32))
    np.testing.assert_array_equal(proj[0], rkv[0])  # r passes through untouched


# ---- argmax: one workgroup per head row chunk, folded into a running best ----

def test_argmax_over_chunks_takes_the_first_of_equal_maxima():
    rng = np.random.default_rng(13)
    logits = rand(rng, 1000)
    logits[[5, 400, 777]] = 9.0  # ties across chunks: the lowest index wins
    logits[900] = -np.inf
    chunks = [(0, 300), (300, 301), (601, 399)]  # chunk boundaries off any power of two
    best = np.array([0xDEADBEEF, 0], np.uint32)  # the first chunk must overwrite it
    for i, (row0, rows) in enumerate(chunks):
        _, best = run_kernel("argmax", [], "argmax", [rows, row0, int(i == 0)], [logits[row0:row0 + rows], best], (1, 1, 1))
    assert best[0] == 5 and best[1:].view(np.float32)[0] == 9.0
    # Only -inf and one finite value: the finite one.
    only = np.full(600, -np.inf, np.float32)
    only[599] = -1e30
    _, got = run_kernel("argmax", [], "argmax", [600, 0, 1], [only, np.zeros(2, np.uint32)], (1, 1, 1))
    assert got[0] == 599


def test_argmax_of_several_tokens_into_their_own_rows():
    """workgroup_id.y = token: each token's logits row folds into best row out0 + token,
    over two head chunks, as a batch of sequences uses it."""
    rng = np.random.default_rng(14)
    tokens, vocab, out0 = 3, 700, 2
    logits = rand(rng, tokens, vocab)
    logits[1, [10, 650]] = 50.0  # a tie across the two chunks: 10 wins
    chunks = [(0, 333), (333, 367)]
    best = np.full((out0 + tokens + 1, 2), 0xDEADBEEF, np.uint32)
    for i, (row0, rows) in enumerate(chunks):
        part = np.ascontiguousarray(logits[:, row0:row0 + rows])
        _, best = run_kernel("argmax", [], "argmax", [rows, row0, int(i == 0), out0], [part, best], (1, tokens, 1))
    assert best[out0:out0 + tokens, 0].tolist() == np.argmax(logits, axis=1).tolist()
    np.testing.assert_array_equal(best[out0:out0 + tokens, 1].view(np.float32), logits.max(axis=1))
    assert np.all(best[:out0] == 0xDEADBEEF) and np.all(best[out0 + tokens] == 0xDEADBEEF)


# ---- copy: the bandwidth probe, one 16-byte word per thread over a 2-D grid ----

def test_copy_moves_exactly_n_words():
    rng = np.random.default_rng(15)
    n = 1000  # 3.9 workgroups of 256: the last partly idle
    src = rng.integers(0, 2**32, size=(n + 24, 4), dtype=np.uint32)
    dst = np.zeros_like(src)
    _, got = run_kernel("copy", [], "copy", [n], [src, dst], (2, 2, 1))
    np.testing.assert_array_equal(got[:n], src[:n])
    assert not got[n:].any()  # words past n untouched
