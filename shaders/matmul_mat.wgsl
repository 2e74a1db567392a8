// Matrix-matrix products for prefill chunks: 64x64 output tiles staged through
// workgroup memory. See matmul_common.wgsl for the groups, formats and flags.
#include "matmul_common.wgsl"

// ---- matmul_tiled: 8x8 threads, each computing 8 rows x 8 tokens of a 64x64 tile ----
//
// Both tiles are staged in their natural order, K innermost (w_tile[row][k],
// x_tile[token][k], as vec4s of four k), so that each thread's global loads land as whole
// vec4s; a row of KSTEP / 4 vec4s is padded by one, so that the 8 rows a group of lanes
// reads at once are spread over all banks (and its token is one broadcast). Thread (x, y)
// owns rows x, x + 8, ..., x + 56 and tokens y, y + 8, ..., y + 56: for one k quad it
// reads 8 + 8 vec4s from workgroup memory and does 64 four-term dot products (256
// multiply-adds), a quarter of a load per multiply-add; the small workgroup (64 threads)
// keeps barriers cheap where a workgroup runs as a loop over its invocations (CPU
// drivers) and the 64 accumulators keep arithmetic ahead of workgroup-memory traffic on
// GPUs. In its stores, 8 neighbouring threads write 8 consecutive outputs of one token.
// The next K step's weights and inputs are loaded into registers while the current one
// is computed (one step ahead), so global latency overlaps the arithmetic. Workgroup
// memory: 2 x 64 x 5 x 16 bytes = 10 KiB.
const TILE: u32 = 64u;
const THREADS: u32 = 64u;  // 8 x 8
const KSTEP: u32 = 16u;
const KQ: u32 = 4u;      // KSTEP / 4: vec4s of a staged row
const KQ_PAD: u32 = 5u;  // with the bank padding
const W_LOADS: u32 = 2u; // runs of 8 weights per thread per K step: 64 x 16 / 8 / THREADS
const X_LOADS: u32 = 4u; // vec4s of inputs per thread per K step: 64 x 16 / 4 / THREADS
var<workgroup> w_tile: array<vec4<f32>, 320>;  // [TILE rows][KQ_PAD]
var<workgroup> x_tile: array<vec4<f32>, 320>;  // [TILE tokens][KQ_PAD]

// What one thread stages of one K step: W_LOADS runs of eight weights, X_LOADS vec4s
// of inputs.
struct Staged {
    w: array<array<vec4<f32>, 2>, W_LOADS>,
    x: array<vec4<f32>, X_LOADS>,
}

// Thread li's share of the K step at k0; its e-th run is run li + THREADS e of the
// tile's 128. nn.Linear layout: 8 weights of one row (64 rows x 2 runs of 8);
// input-major (INPUT_MAJOR_W: every group of the variant), 8 outputs of one input
// (16 inputs x 8 runs of 8). Inputs: vec4
// li + THREADS e of 64 tokens x 4 quads.
fn load_step(g: Group, li: u32, m0: u32, t0: u32, k0: u32) -> Staged {
    var s: Staged;
    for (var e = 0u; e < W_LOADS; e++) {
        let run = li + THREADS * e;
        s.w[e] = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
#ifdef INPUT_MAJOR_W
        let kk = run / 8u;
        let r = 8u * (run % 8u);
        if (m0 + r < g.m && k0 + kk < g.k) {
            s.w[e] = weights8(g, k0 + kk, m0 + r, g.m);
        }
#else
        let r = run / 2u;
        let kk = 8u * (run % 2u);
        if (m0 + r < g.m && k0 + kk < g.k) {
            s.w[e] = weights8(g, m0 + r, k0 + kk, g.k);
        }
#endif
    }
    for (var e = 0u; e < X_LOADS; e++) {
        let quad = li + THREADS * e;
        let tt = quad / 4u;
        let kk = 4u * (quad % 4u);
        s.x[e] = vec4<f32>(0.0);
        if (t0 + tt < p.t && k0 + kk < g.k) {
            s.x[e] = x[(g.x_off + (t0 + tt) * g.x_stride + k0 + kk) / 4u];
        }
    }
    return s;
}

fn store_step(s: Staged, li: u32) {
    for (var e = 0u; e < W_LOADS; e++) {
        let run = li + THREADS * e;
#ifdef INPUT_MAJOR_W
        // Eight rows at one k: a column of the tile.
        let kk = run / 8u;
        let r = 8u * (run % 8u);
        for (var i = 0u; i < 8u; i++) {
            w_tile[(r + i) * KQ_PAD + kk / 4u][kk % 4u] = s.w[e][i / 4u][i % 4u];
        }
#else
        let r = run / 2u;
        let q = 2u * (run % 2u);
        w_tile[r * KQ_PAD + q] = s.w[e][0];
        w_tile[r * KQ_PAD + q + 1u] = s.w[e][1];
#endif
    }
    for (var e = 0u; e < X_LOADS; e++) {
        let quad = li + THREADS * e;
        x_tile[(quad / 4u) * KQ_PAD + quad % 4u] = s.x[e];
    }
}

// Four rows' dot products with one token's inputs.
fn dots4(a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>, x: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(a, x), dot(b, x), dot(c, x), dot(d, x));
}

// One k quad of a thread's 8 rows x 8 tokens, both kernels: w[i] is row i's quad, x[j]
// token j's; acc[2 j + h][e] sums row 4 h + e, token j. Written out, not looped: with
// the loops rolled, lavapipe keeps the values in memory and indexes them per lane
// (measured 7% slower in matmul_tiled, 1.3x in matmul_direct).
fn mac_quad(acc: ptr<function, array<vec4<f32>, 16>>, w: array<vec4<f32>, 8>, x: array<vec4<f32>, 8>) {
    (*acc)[0] += dots4(w[0], w[1], w[2], w[3], x[0]);
    (*acc)[1] += dots4(w[4], w[5], w[6], w[7], x[0]);
    (*acc)[2] += dots4(w[0], w[1], w[2], w[3], x[1]);
    (*acc)[3] += dots4(w[4], w[5], w[6], w[7], x[1]);
    (*acc)[4] += dots4(w[0], w[1], w[2], w[3], x[2]);
    (*acc)[5] += dots4(w[4], w[5], w[6], w[7], x[2]);
    (*acc)[6] += dots4(w[0], w[1], w[2], w[3], x[3]);
    (*acc)[7] += dots4(w[4], w[5], w[6], w[7], x[3]);
    (*acc)[8] += dots4(w[0], w[1], w[2], w[3], x[4]);
    (*acc)[9] += dots4(w[4], w[5], w[6], w[7], x[4]);
    (*acc)[10] += dots4(w[0], w[1], w[2], w[3], x[5]);
    (*acc)[11] += dots4(w[4], w[5], w[6], w[7], x[5]);
    (*acc)[12] += dots4(w[0], w[1], w[2], w[3], x[6]);
    (*acc)[13] += dots4(w[4], w[5], w[6], w[7], x[6]);
    (*acc)[14] += dots4(w[0], w[1], w[2], w[3], x[7]);
    (*acc)[15] += dots4(w[4], w[5], w[6], w[7], x[7]);
}

@compute @workgroup_size(8, 8)
fn matmul_tiled(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
#ifdef HAS_NF4
    load_nf4_table(li);
#endif
    let at = locate(wid.y * nwg.x + wid.x, TILE, (p.t + TILE - 1u) / TILE);
    if (at.group >= p.n_groups) {
        return;
    }
    let g = p.groups[at.group];
    let tiles_m = (g.m + TILE - 1u) / TILE;
    let m0 = (at.block % tiles_m) * TILE;
    let t0 = (at.block / tiles_m) * TILE;

    // acc[2 j + h][i]: row lid.x + 8 (4 h + i), token lid.y + 8 j.
    var acc: array<vec4<f32>, 16>;
    for (var a = 0u; a < 16u; a++) {
        acc[a] = vec4<f32>(0.0);
    }
    var next = load_step(g, li, m0, t0, 0u);
    for (var k0 = 0u; k0 < g.k; k0 += KSTEP) {
        store_step(next, li);
        workgroupBarrier();
        if (k0 + KSTEP < g.k) {
            next = load_step(g, li, m0, t0, k0 + KSTEP);
        }
        for (var q = 0u; q < KQ; q++) {
            var wq: array<vec4<f32>, 8>;
            var xq: array<vec4<f32>, 8>;
            for (var i = 0u; i < 8u; i++) {
                wq[i] = w_tile[(lid.x + 8u * i) * KQ_PAD + q];
                xq[i] = x_tile[(lid.y + 8u * i) * KQ_PAD + q];
            }
            mac_quad(&acc, wq, xq);
        }
        workgroupBarrier();
    }
    var rows: array<u32, 8>;
    for (var r = 0u; r < 8u; r++) {
        rows[r] = m0 + lid.x + 8u * r;
    }
    store_tile(g, &acc, rows, t0 + lid.y);
}

// The epilogue of both SIMT kernels: acc[2 j + h][e] is output row rows[4 h + e] of
// token t + 8 j; what lies outside the matrix or the chunk is dropped.
fn store_tile(g: Group, acc: ptr<function, array<vec4<f32>, 16>>, rows: array<u32, 8>, t: u32) {
    for (var h = 0u; h < 2u; h++) {
        for (var j = 0u; j < 8u; j++) {
            let tj = t + 8u * j;
            for (var e = 0u; e < 4u; e++) {
                let m = rows[4u * h + e];
                if (tj < p.t && m < g.m) {
                    store(g, tj, m, (*acc)[2u * j + h][e]);
                }
            }
        }
    }
}

// ---- matmul_direct: the same tiles and threads, every operand loaded by its thread ----
//
// For CPU drivers (Loads::Direct in variants.rs), where a workgroup runs as a loop over
// its invocations and every per-lane load, from workgroup or storage memory alike, is a
// scalar loop over the SIMD lanes: staging through workgroup memory there only adds
// loads and barriers. Thread (x, y) computes the same 8 rows x 8 tokens as matmul_tiled
// and reads them straight from the buffers, per 8 k: its 8 rows' weights (one vec4<u32>
// each for f16) and its 8 tokens' inputs (two vec4 each): 24 loads for 512 multiply-adds,
// against 32 from workgroup memory plus the staging in matmul_tiled (measured on
// lavapipe: 0.66x the time, fp16 1024 x 1024 over 64 tokens). It multiplies the same
// dequantized values in the same order (four-term dot products, k quads in order), so its
// outputs equal matmul_tiled's (to the bit, unless the driver fuses differently). On a GPU it would read each weight 8 times
// from cache instead of once from memory: never chosen there.
// Rows: nn.Linear layout, x + 8 i (as matmul_tiled); input-major, 8 x + i, so that one
// stored row (one input's outputs) gives the thread all 8 at once.

// The thread's 8 tokens' inputs at k quad q: token j's from vec4 xrow[j] + q.
fn direct_inputs(xrow: array<u32, 8>, q: u32) -> array<vec4<f32>, 8> {
    var out: array<vec4<f32>, 8>;
    for (var j = 0u; j < 8u; j++) {
        out[j] = x[xrow[j] + q];
    }
    return out;
}

// Input-major weights, per 8 k: stored rows k0 .. k0 + 7 each give the thread's 8
// outputs at once; transposed here into the 8 outputs' two k quads.
fn direct_input_major(acc: ptr<function, array<vec4<f32>, 16>>, g: Group, col: u32, k0: u32, xrow: array<u32, 8>) {
    // columns[kk][h][e]: output col + 4 h + e at k0 + kk.
    var columns: array<array<vec4<f32>, 2>, 8>;
    for (var kk = 0u; kk < 8u; kk++) {
        columns[kk] = weights8(g, k0 + kk, col, g.m);
    }
    var lo: array<vec4<f32>, 8>;
    var hi: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let h = i / 4u;
        let e = i % 4u;
        lo[i] = vec4<f32>(columns[0][h][e], columns[1][h][e], columns[2][h][e], columns[3][h][e]);
        hi[i] = vec4<f32>(columns[4][h][e], columns[5][h][e], columns[6][h][e], columns[7][h][e]);
    }
    mac_quad(acc, lo, direct_inputs(xrow, k0 / 4u));
    mac_quad(acc, hi, direct_inputs(xrow, k0 / 4u + 1u));
}

// nn.Linear layout, one vec4<u32> of each of the thread's 8 rows per step (8 k for
// 16-bit formats, 16 for int8, 32 for nf4), so that every loaded word is used whole;
// a quantized row's block scale is read once per 64 k. Dequantized as weights8 does
// (w = q * s per weight, k quads in order), so the sums equal matmul_tiled's.
// words[i]: row i's word; scale[i] its block's scale.
fn quad_f16(g: Group, words: array<vec4<u32>, 8>, q: u32) -> array<vec4<f32>, 8> {
    var out: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        out[i] = vec4<f32>(unpack_pair(g, words[i][2u * q]), unpack_pair(g, words[i][2u * q + 1u]));
    }
    return out;
}

#ifdef HAS_INT8
fn quad_int8(words: array<vec4<u32>, 8>, scale: array<f32, 8>, q: u32) -> array<vec4<f32>, 8> {
    var out: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        out[i] = unpack_int8(words[i][q]) * scale[i];
    }
    return out;
}
#endif

#ifdef HAS_NF4
fn quad_nf4(words: array<vec4<u32>, 8>, scale: array<f32, 8>, q: u32) -> array<vec4<f32>, 8> {
    var out: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        out[i] = unpack_nf4(words[i], q) * scale[i];
    }
    return out;
}
#endif

// Where the thread's 8 rows start: row i's first word of weights (codes) and of block
// scales. Rows past the matrix read its last row.
struct RowStarts {
    words: array<u32, 8>,
    scales: array<u32, 8>,
}

fn row_starts(g: Group, m0: u32, lx: u32) -> RowStarts {
    var at: RowStarts;
    for (var i = 0u; i < 8u; i++) {
        let row = min(m0 + lx + 8u * i, g.m - 1u);
        at.words[i] = g.w_off / 4u + row * (g.k / per_word4(g));
        at.scales[i] = g.s_off + row * ((g.k + 127u) / 128u);
    }
    return at;
}

// The 8 rows' words at word index `word` of their rows.
fn row_words(at: RowStarts, word: u32) -> array<vec4<u32>, 8> {
    var out: array<vec4<u32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        out[i] = w[at.words[i] + word];
    }
    return out;
}

// The 8 rows' scales of the block of 64 at k0.
fn row_scales(at: RowStarts, k0: u32) -> array<f32, 8> {
    var out: array<f32, 8>;
    for (var i = 0u; i < 8u; i++) {
        let pair = unpack2x16float(scales[at.scales[i] + k0 / 128u]);
        out[i] = select(pair.x, pair.y, (k0 / 64u) % 2u == 1u);
    }
    return out;
}

// The thread's rows of an nn.Linear-layout group through all of K: one loop per format,
// the branch outside it (inside, a CPU driver that runs both sides of a branch under a
// lane mask paid for every format's body each step: 2.3x the time for f16 weights).
fn direct_rows(acc: ptr<function, array<vec4<f32>, 16>>, g: Group, m0: u32, lx: u32, xrow: array<u32, 8>) {
    let at = row_starts(g, m0, lx);
    let f = format_of(g);
#ifdef HAS_INT8
    if (f == FMT_INT8) {
        // One loop, the scales reloaded every fourth step (measured 0.88x the time of
        // a loop over blocks around one over their words).
        var scale: array<f32, 8>;
        for (var k0 = 0u; k0 < g.k; k0 += 16u) {
            if (k0 % 64u == 0u) {
                scale = row_scales(at, k0);
            }
            let words = row_words(at, k0 / 16u);
            let q0 = k0 / 4u;
            mac_quad(acc, quad_int8(words, scale, 0u), direct_inputs(xrow, q0));
            mac_quad(acc, quad_int8(words, scale, 1u), direct_inputs(xrow, q0 + 1u));
            mac_quad(acc, quad_int8(words, scale, 2u), direct_inputs(xrow, q0 + 2u));
            mac_quad(acc, quad_int8(words, scale, 3u), direct_inputs(xrow, q0 + 3u));
        }
        return;
    }
#endif
#ifdef HAS_NF4
    if (f == FMT_NF4) {
        var scale: array<f32, 8>;
        for (var k0 = 0u; k0 < g.k; k0 += 32u) {
            if (k0 % 64u == 0u) {
                scale = row_scales(at, k0);
            }
            let words = row_words(at, k0 / 32u);
            let q0 = k0 / 4u;
            mac_quad(acc, quad_nf4(words, scale, 0u), direct_inputs(xrow, q0));
            mac_quad(acc, quad_nf4(words, scale, 1u), direct_inputs(xrow, q0 + 1u));
            mac_quad(acc, quad_nf4(words, scale, 2u), direct_inputs(xrow, q0 + 2u));
            mac_quad(acc, quad_nf4(words, scale, 3u), direct_inputs(xrow, q0 + 3u));
            mac_quad(acc, quad_nf4(words, scale, 4u), direct_inputs(xrow, q0 + 4u));
            mac_quad(acc, quad_nf4(words, scale, 5u), direct_inputs(xrow, q0 + 5u));
            mac_quad(acc, quad_nf4(words, scale, 6u), direct_inputs(xrow, q0 + 6u));
            mac_quad(acc, quad_nf4(words, scale, 7u), direct_inputs(xrow, q0 + 7u));
        }
        return;
    }
#endif
    // 16-bit formats (bf16 through unpack_pair).
    for (var k0 = 0u; k0 < g.k; k0 += 8u) {
        let words = row_words(at, k0 / 8u);
        mac_quad(acc, quad_f16(g, words, 0u), direct_inputs(xrow, k0 / 4u));
        mac_quad(acc, quad_f16(g, words, 1u), direct_inputs(xrow, k0 / 4u + 1u));
    }
}

// The output row of this thread's row i.
fn direct_row(m0: u32, lx: u32, i: u32) -> u32 {
#ifdef INPUT_MAJOR_W
    return m0 + 8u * lx + i;
#else
    return m0 + lx + 8u * i;
#endif
}

@compute @workgroup_size(8, 8)
fn matmul_direct(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
#ifdef HAS_NF4
    load_nf4_table(li);
#endif
    let at = locate(wid.y * nwg.x + wid.x, TILE, (p.t + TILE - 1u) / TILE);
    if (at.group >= p.n_groups) {
        return;
    }
    let g = p.groups[at.group];
    let tiles_m = (g.m + TILE - 1u) / TILE;
    let m0 = (at.block % tiles_m) * TILE;
    let t0 = (at.block / tiles_m) * TILE;
    // Token j's inputs from vec4 xrow[j] (tokens past the chunk read the last one).
    var xrow: array<u32, 8>;
    for (var j = 0u; j < 8u; j++) {
        xrow[j] = (g.x_off + min(t0 + lid.y + 8u * j, p.t - 1u) * g.x_stride) / 4u;
    }
    // acc[2 j + h][e]: row 4 h + e, token j.
    var acc: array<vec4<f32>, 16>;
    for (var a = 0u; a < 16u; a++) {
        acc[a] = vec4<f32>(0.0);
    }
#ifdef INPUT_MAJOR_W
    let col = min(m0 + 8u * lid.x, g.m - 8u);
    for (var k0 = 0u; k0 < g.k; k0 += 8u) {
        direct_input_major(&acc, g, col, k0, xrow);
    }
#else
    direct_rows(&acc, g, m0, lid.x, xrow);
#endif
    var rows: array<u32, 8>;
    for (var r = 0u; r < 8u; r++) {
        rows[r] = direct_row(m0, lid.x, r);
    }
    store_tile(g, &acc, rows, t0 + lid.y);
}
