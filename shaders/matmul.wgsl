// y[t, m] (+)= act(sum_k W[m, k] * x[x_off + t * K + k]) for up to four weight matrices
// ("groups") of one weight buffer in one dispatch: workgroup_id.z picks the group, each
// with its own shape, offsets, activation and accumulate flag. Matrices are in nn.Linear
// layout [M, K], stored as 16-bit floats packed two per u32 along K, so that devices
// without shader-f16 run it, or quantized in blocks of 64 along K and dequantized here
// (never materialised). All arithmetic is f32.
//
// Weight formats (one per dispatch): f16 pairs (default), WEIGHT_BF16 (bf16 pairs), and
// with WEIGHT_QUANT either WEIGHT_INT8 (codes -127..127, 4 per u32, one f16 scale per
// block: w = q * s) or WEIGHT_NF4 (QLoRA NormalFloat codes, 8 per u32 low nibble first,
// one f16 absmax per block: w = NF4[q] * s). A quantized matrix holds its codes [M, K /
// per-word] from word w_off and its scales from word s_off: ceil(K / 128) u32 per row,
// two f16 each.
// Activations (flags bits 0-3): 0 none, 1 tanh, 2 sigmoid, 3 relu(v)^2; flags bit 4:
// accumulate into y (the residual stream).
// Two entry points: `matvec` for a few tokens (weights streamed once per group of 4
// tokens, reduction over K in workgroup memory) and `matmul_tiled` for prefill chunks
// (64x64 output tiles, 16-deep K steps staged in workgroup memory).

struct Group {
    m: u32,        // output rows
    k: u32,        // input width, even (a multiple of 64 when quantized)
    w_off: u32,    // first word of the weights (codes) in `w`
    s_off: u32,    // quantized formats: first word of the block scales
    x_off: u32,    // first element of this group's input in x
    y_off: u32,    // element of y that (token 0, row 0) lands in
    y_stride: u32, // elements between tokens in y
    flags: u32,    // activation | ADD << 4
}

struct Params {
    t: u32,        // tokens
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    groups: array<Group, 4>,
}

const ACT_TANH: u32 = 1u;
const ACT_SIGMOID: u32 = 2u;
const ACT_RELU_SQ: u32 = 3u;
const ADD: u32 = 16u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;        // the groups' weights, packed
@group(0) @binding(2) var<storage, read> x: array<f32>;        // (T, K) at each group's x_off
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // (T, y_stride) at each group's y_off

fn unpack_pair(v: u32) -> vec2<f32> {
#ifdef WEIGHT_BF16
    return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xffff0000u));
#else
    return unpack2x16float(v);
#endif
}

#ifdef WEIGHT_QUANT
#ifdef WEIGHT_NF4
var<private> NF4: array<f32, 16> = array<f32, 16>(
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176514, 0.7229568362236328, 1.0);
#endif

// The scale of the 64-wide block holding column 4q of `row`.
fn block_scale(g: Group, row: u32, q: u32) -> f32 {
    let block = q / 16u;
    let pair = unpack2x16float(w[g.s_off + row * ((g.k + 127u) / 128u) + block / 2u]);
    return select(pair.x, pair.y, (block & 1u) == 1u);
}

// Weights W[row, 4q .. 4q + 3], dequantized.
fn weight_quad(g: Group, row: u32, q: u32) -> vec4<f32> {
#ifdef WEIGHT_INT8
    let word = w[g.w_off + row * (g.k / 4u) + q];
    // Sign-extend each byte: move it to the top, then shift back arithmetically.
    let bytes = vec4<i32>(bitcast<i32>(word << 24u), bitcast<i32>(word << 16u), bitcast<i32>(word << 8u), bitcast<i32>(word)) >> vec4<u32>(24u);
    return vec4<f32>(bytes) * block_scale(g, row, q);
#else
    let word = w[g.w_off + row * (g.k / 8u) + q / 2u] >> (16u * (q & 1u));
    let codes = vec4<f32>(NF4[word & 15u], NF4[(word >> 4u) & 15u], NF4[(word >> 8u) & 15u], NF4[(word >> 12u) & 15u]);
    return codes * block_scale(g, row, q);
#endif
}
#endif

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

// ---- matvec: workgroup = 16 rows x 16 lanes; each lane strides over K ----
// Each lane reads four weights per step (16 lanes: 128 contiguous bytes of a 16-bit row)
// and applies them to up to TOKENS tokens, so a batch of that many decode steps reads
// the weights once. The loop runs to the live token count and indexes one vec4 of
// sums: on lavapipe, 1.4-2x faster than four guarded tokens per step, while eight
// tokens per pass (an array of two vec4) ran slower at 4 tokens than two passes of four.
// (16 lanes x 16 rows: 64 lanes x 4 rows ran 1.5x slower on lavapipe.)

const LANES: u32 = 16u;
const ROWS: u32 = 16u;
const TOKENS: u32 = 4u;
var<workgroup> lane_sums: array<vec4<f32>, 256>;  // (ROWS * LANES): one sum per token

// Weights W[row, 4q .. 4q + 3] as f32.
fn quad(g: Group, row: u32, q: u32) -> vec4<f32> {
#ifdef WEIGHT_QUANT
    return weight_quad(g, row, q);
#else
    let at = g.w_off + row * (g.k / 2u) + 2u * q;
    return vec4<f32>(unpack_pair(w[at]), unpack_pair(w[at + 1u]));
#endif
}

@compute @workgroup_size(16, 16)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let g = p.groups[wid.z];
    let group = wid.y * nwg.x + wid.x;
    if (group * ROWS >= g.m) {
        return;
    }
    let row = group * ROWS + lid.y;
    let live = row < g.m;
    let slot = lid.y * LANES + lid.x;

    for (var t0 = 0u; t0 < p.t; t0 += TOKENS) {
        let n = min(TOKENS, p.t - t0);
        // Initialised explicitly: naga declares function variables once, at the top.
        var acc = vec4<f32>(0.0);
        if (live) {
            for (var q = lid.x; q < g.k / 4u; q += LANES) {
                let wv = quad(g, row, q);
                for (var j = 0u; j < n; j++) {
                    let xi = g.x_off + (t0 + j) * g.k + 4u * q;
                    acc[j] += dot(wv, vec4<f32>(x[xi], x[xi + 1u], x[xi + 2u], x[xi + 3u]));
                }
            }
#ifndef WEIGHT_QUANT
            // 16-bit rows with K = 4n + 2: the last word. (Quantized K is a multiple of 64.)
            if ((g.k & 2u) != 0u && lid.x == 0u) {
                let wv = unpack_pair(w[g.w_off + row * (g.k / 2u) + g.k / 2u - 1u]);
                for (var j = 0u; j < n; j++) {
                    let xi = g.x_off + (t0 + j) * g.k + g.k - 2u;
                    acc[j] += wv.x * x[xi] + wv.y * x[xi + 1u];
                }
            }
#endif
        }
        lane_sums[slot] = acc;
        workgroupBarrier();
        for (var s = LANES / 2u; s > 0u; s = s >> 1u) {
            if (lid.x < s) {
                lane_sums[slot] += lane_sums[slot + s];
            }
            workgroupBarrier();
        }
        if (live && lid.x == 0u) {
            for (var j = 0u; j < n; j++) {
                store(g, t0 + j, row, lane_sums[slot][j]);
            }
        }
        workgroupBarrier();
    }
}

// ---- matmul_tiled: 16x16 threads, each computing 4 rows x 4 tokens of a 64x64 tile ----

// The tiles hold quads (four rows, four tokens) so that the inner loop reads one vec4
// of each per step: two loads for 16 multiply-adds.
const TILE: u32 = 64u;
const QUADS: u32 = 16u;  // TILE / 4
const KSTEP: u32 = 16u;
var<workgroup> w_tile: array<vec4<f32>, 256>;  // [KSTEP][TILE / 4 row quads]
var<workgroup> x_tile: array<vec4<f32>, 256>;  // [KSTEP][TILE / 4 token quads]

@compute @workgroup_size(16, 16)
fn matmul_tiled(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let g = p.groups[wid.z];
    let tiles_m = (g.m + TILE - 1u) / TILE;
    let tiles_t = (p.t + TILE - 1u) / TILE;
    let tile = wid.y * nwg.x + wid.x;
    if (tile >= tiles_m * tiles_t) {
        return;
    }
    let m0 = (tile % tiles_m) * TILE;
    let t0 = (tile / tiles_m) * TILE;
    let half_k = g.k / 2u;

    var acc: array<vec4<f32>, 4>;  // acc[token][row]
    for (var k0 = 0u; k0 < g.k; k0 += KSTEP) {
#ifdef WEIGHT_QUANT
        // Weights: 64 rows x 4 quads, one per thread (K is a multiple of 64).
        {
            let r = li / 4u;
            let quad = li % 4u;
            var v = vec4<f32>(0.0);
            if (m0 + r < g.m) {
                v = weight_quad(g, m0 + r, (k0 + 4u * quad) / 4u);
            }
            for (var e = 0u; e < 4u; e++) {
                w_tile[(4u * quad + e) * QUADS + r / 4u][r % 4u] = v[e];
            }
        }
#else
        // Weights: 64 rows x 8 pairs = 512 u32, two per thread.
        for (var q = li; q < 512u; q += 256u) {
            let r = q / 8u;
            let pair = q % 8u;
            let kk = k0 + 2u * pair;
            var v = vec2<f32>(0.0);
            if (m0 + r < g.m && kk < g.k) {
                v = unpack_pair(w[g.w_off + (m0 + r) * half_k + kk / 2u]);
            }
            w_tile[(2u * pair) * QUADS + r / 4u][r % 4u] = v.x;
            w_tile[(2u * pair + 1u) * QUADS + r / 4u][r % 4u] = v.y;
        }
#endif
        // Inputs: 64 tokens x 16 k, four per thread.
        for (var q = li; q < 1024u; q += 256u) {
            let tt = q / KSTEP;
            let kk = q % KSTEP;
            var v = 0.0;
            if (t0 + tt < p.t && k0 + kk < g.k) {
                v = x[g.x_off + (t0 + tt) * g.k + k0 + kk];
            }
            x_tile[kk * QUADS + tt / 4u][tt % 4u] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KSTEP; kk++) {
            let wr = w_tile[kk * QUADS + lid.y];
            let xv = x_tile[kk * QUADS + lid.x];
            acc[0] += wr * xv.x;
            acc[1] += wr * xv.y;
            acc[2] += wr * xv.z;
            acc[3] += wr * xv.w;
        }
        workgroupBarrier();
    }
    for (var j = 0u; j < 4u; j++) {
        let t = t0 + lid.x * 4u + j;
        for (var i = 0u; i < 4u; i++) {
            let m = m0 + lid.y * 4u + i;
            if (t < p.t && m < g.m) {
                store(g, t, m, acc[j][i]);
            }
        }
    }
}
