// Shared by matmul_vec.wgsl and matmul_mat.wgsl (#include): y[t, m] (+)= act(sum_k
// W[m, k] * x[x_off + t * K + k]) for up to eight weight matrices ("groups") of one
// weight buffer in one dispatch. workgroup_id.z picks the group, each with its own shape,
// offsets, weight format, activation and accumulate flag. Matrices are in nn.Linear
// layout [M, K], every row starting on a 16-byte boundary, or (flag INPUT_MAJOR, read by
// matmul_sparse.wgsl and matmul_mat.wgsl) input-major, stored [K, M]: "row" and "width"
// below then mean a stored row (one input's M weights) and M. All arithmetic is f32.
//
// Weight formats (flags bits 8-9; a variant compiles only the formats it lists, and with
// SINGLE_FORMAT assumes its one format):
//   F16   16-bit floats, 8 per vec4<u32> (K a multiple of 8)
//   BF16  the same, bf16 (HAS_BF16; for matrices with values beyond the fp16 range)
//   INT8  codes -127..127, 16 per vec4<u32>, one f16 scale per block of 64 along a row:
//         w = q * s (HAS_INT8)
//   NF4   QLoRA NormalFloat codes, 32 per vec4<u32>, low nibble first, one f16 absmax
//         per block of 64: w = NF4[q] * s (HAS_NF4)
// A quantized matrix holds its codes [rows, width / per word] from word w_off and its
// scales from word s_off: ceil(width / 128) u32 per row, two f16 each, read through
// `scales` (the same buffer as `w`).
// Activations (flags bits 0-3): 0 none, 1 tanh, 2 sigmoid, 3 relu(v)^2; flags bit 4:
// accumulate into y (the residual stream); bit 5: INPUT_MAJOR.

struct Group {
    m: u32,        // outputs: a multiple of 8 when input-major
    k: u32,        // inputs: a multiple of 8 (64 when quantized)
    w_off: u32,    // first word of the weights (codes) in the buffer: a multiple of 4
    s_off: u32,    // quantized formats: first word of the block scales
    x_off: u32,    // first element of this group's input in x: a multiple of 4
    x_stride: u32, // elements between tokens in x: a multiple of 4
    y_off: u32,    // element of y that (token 0, row 0) lands in
    y_stride: u32, // elements between tokens in y
    flags: u32,    // activation | ADD | INPUT_MAJOR | format << 8
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct Params {
    t: u32,        // tokens
    count_at: u32, // matmul_sparse.wgsl with COUNT_READS: first of its four counters
    n_groups: u32, // groups in use, 1 ..= 8
    _pad: u32,
    groups: array<Group, 8>,
}

const ACT_TANH: u32 = 1u;
const ACT_SIGMOID: u32 = 2u;
const ACT_RELU_SQ: u32 = 3u;
const ADD: u32 = 16u;
const INPUT_MAJOR: u32 = 32u;
const FMT_F16: u32 = 0u;
const FMT_BF16: u32 = 1u;
const FMT_INT8: u32 = 2u;
const FMT_NF4: u32 = 3u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;       // the groups' weights (codes), rows of K / per-word words
@group(0) @binding(2) var<storage, read> scales: array<u32>;        // the same buffer, as words: block scales
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;       // (T, K) at each group's x_off
@group(0) @binding(4) var<storage, read_write> y: array<f32>;       // (T, y_stride) at each group's y_off

// Where workgroup `index` of the flat grid works: the groups' blocks run back to back,
// group 0's first, block b of a group covering its outputs b % ceil(m / rows) (of
// `rows` each) and token tile b / ceil(m / rows) (of `token_tiles`). A grid of groups x
// the largest group's blocks would leave most workgroups of a small group (a low-rank
// matrix beside r, k, v) idle, and a driver that splits a grid statically between CPU
// cores unbalanced. `group` is p.n_groups past the last block. Uniform per workgroup.
struct Place {
    group: u32,
    block: u32,
}

fn locate(index: u32, rows: u32, token_tiles: u32) -> Place {
    var left = index;
    for (var i = 0u; i < p.n_groups; i++) {
        let n = (p.groups[i].m + rows - 1u) / rows * token_tiles;
        if (left < n) {
            return Place(i, left);
        }
        left -= n;
    }
    return Place(p.n_groups, 0u);
}

// The group's weight format. Every kernel asks, so the discarded read of `scales` here
// keeps that binding in variants whose formats have no block scales: the host binds it
// to every variant, and a pipeline layout derived from the shader lists only the
// bindings its code uses.
fn format_of(g: Group) -> u32 {
    _ = scales[0];
#ifdef SINGLE_FORMAT
    // A variant of one format (SINGLE_FORMAT, e.g. FMT_INT8): a constant, so that every
    // branch on the format folds away.
    return SINGLE_FORMAT;
#else
    return (g.flags >> 8u) & 3u;
#endif
}

// Weights per vec4<u32> of a row.
fn per_word4(g: Group) -> u32 {
    switch (format_of(g)) {
        case FMT_INT8: { return 16u; }
        case FMT_NF4: { return 32u; }
        default: { return 8u; }
    }
}

// Two 16-bit weights of one word.
fn unpack_pair(g: Group, v: u32) -> vec2<f32> {
#ifdef HAS_BF16
    if (format_of(g) == FMT_BF16) {
        return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xffff0000u));
    }
#endif
    return unpack2x16float(v);
}

// Four int8 codes of one word, sign-extended.
fn unpack_int8(v: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>(bitcast<i32>(v << 24u), bitcast<i32>(v << 16u), bitcast<i32>(v << 8u), bitcast<i32>(v)) >> vec4<u32>(24u));
}

// The f16 scale of block `block` of stored row `row` (quantized formats), rows `width` wide.
fn block_scale_w(g: Group, row: u32, block: u32, width: u32) -> f32 {
    let pair = unpack2x16float(scales[g.s_off + row * ((width + 127u) / 128u) + block / 2u]);
    return select(pair.x, pair.y, (block & 1u) == 1u);
}

// The same for an nn.Linear-layout group: rows K wide.
fn block_scale(g: Group, row: u32, block: u32) -> f32 {
    return block_scale_w(g, row, block, g.k);
}

// Eight weights of stored row `row`, columns c0 .. c0 + 7 (c0 a multiple of 8), of rows
// `width` wide, dequantized.
fn weights8(g: Group, row: u32, c0: u32, width: u32) -> array<vec4<f32>, 2> {
    let f = format_of(g);
    let per = per_word4(g);
    let v = w[g.w_off / 4u + row * (width / per) + c0 / per];
    let sub = (c0 % per) / 4u;  // first 4-column block of c0 within the vec4
    var scale = 1.0;
    if (f >= FMT_INT8) {
        scale = block_scale_w(g, row, c0 / 64u, width);
    }
#ifdef HAS_INT8
    if (f == FMT_INT8) {
        return array<vec4<f32>, 2>(unpack_int8(v[sub]) * scale, unpack_int8(v[sub + 1u]) * scale);
    }
#endif
#ifdef HAS_NF4
    if (f == FMT_NF4) {
        return array<vec4<f32>, 2>(unpack_nf4(v, sub) * scale, unpack_nf4(v, sub + 1u) * scale);
    }
#endif
    return array<vec4<f32>, 2>(vec4<f32>(unpack_pair(g, v.x), unpack_pair(g, v.y)), vec4<f32>(unpack_pair(g, v.z), unpack_pair(g, v.w)));
}

fn activate(flags: u32, v: f32) -> f32 {
    switch (flags & 15u) {
        // Clamped: some drivers compute tanh through exp and overflow to NaN for large
        // |v|; tanh(15) is 1 in f32 already.
        case ACT_TANH: { return tanh(clamp(v, -15.0, 15.0)); }
        case ACT_SIGMOID: { return 1.0 / (1.0 + exp(-v)); }
        case ACT_RELU_SQ: {
            let r = max(v, 0.0);
            return r * r;
        }
        default: { return v; }
    }
}

fn store(g: Group, t: u32, m: u32, v: f32) {
    let at = g.y_off + t * g.y_stride + m;
    if ((g.flags & ADD) != 0u) {
        y[at] = y[at] + activate(g.flags, v);
    } else {
        y[at] = activate(g.flags, v);
    }
}

#ifdef HAS_NF4
const NF4_CODES = array<f32, 16>(
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176514, 0.7229568362236328, 1.0);
#ifdef NF4_SELECT
// The code's value by a select tree on its four bits: arithmetic only, for devices
// where a per-lane table load costs more (CPU drivers; see Nf4Lookup in variants.rs).
fn nf4_value(n: u32) -> f32 {
    let b0 = (n & 1u) != 0u;
    let b1 = (n & 2u) != 0u;
    let c = array<vec4<f32>, 4>(
        vec4<f32>(NF4_CODES[0], NF4_CODES[1], NF4_CODES[2], NF4_CODES[3]),
        vec4<f32>(NF4_CODES[4], NF4_CODES[5], NF4_CODES[6], NF4_CODES[7]),
        vec4<f32>(NF4_CODES[8], NF4_CODES[9], NF4_CODES[10], NF4_CODES[11]),
        vec4<f32>(NF4_CODES[12], NF4_CODES[13], NF4_CODES[14], NF4_CODES[15]));
    let b2 = (n & 4u) != 0u;
    let b3 = (n & 8u) != 0u;
    let v = select(select(c[0], c[1], b2), select(c[2], c[3], b2), b3);  // codes 4 (n / 4) ..
    return select(select(v.x, v.y, b0), select(v.z, v.w, b0), b1);
}

// Nothing to load: every thread calls it (the table version holds a barrier).
fn load_nf4_table(thread: u32) {
}

// Four NF4 weights: nibbles 4j .. 4j + 3 of a vec4<u32> (j in 0..8).
fn unpack_nf4(v: vec4<u32>, j: u32) -> vec4<f32> {
    let h = v[j / 2u] >> (16u * (j & 1u));
    return vec4<f32>(nf4_value(h & 15u), nf4_value((h >> 4u) & 15u), nf4_value((h >> 8u) & 15u), nf4_value((h >> 12u) & 15u));
}
#else
// The codebook in workgroup memory: a dynamically indexed private array would live in
// off-chip local memory on NVIDIA and AMD. Filled by the first 8 threads, two codes
// each (the narrowest workgroup, matvec's on CPU drivers, has 8).
var<workgroup> nf4: array<f32, 16>;

// Fills `nf4`; every thread of the workgroup calls it (it holds a barrier).
fn load_nf4_table(thread: u32) {
    if (thread < 8u) {
        nf4[thread] = NF4_CODES[thread];
        nf4[thread + 8u] = NF4_CODES[thread + 8u];
    }
    workgroupBarrier();
}

// Four NF4 weights: nibbles 4j .. 4j + 3 of a vec4<u32> (j in 0..8).
fn unpack_nf4(v: vec4<u32>, j: u32) -> vec4<f32> {
    let h = v[j / 2u] >> (16u * (j & 1u));
    return vec4<f32>(nf4[h & 15u], nf4[(h >> 4u) & 15u], nf4[(h >> 8u) & 15u], nf4[(h >> 12u) & 15u]);
}
#endif
#endif

