// Matrix-vector products for a few tokens (decode, small batches): see
// matmul_common.wgsl for the groups, formats and flags.
#include "matmul_common.wgsl"

// ---- matvec: ROWS rows per workgroup, every thread striding along K ----
//
// LANES threads (variant: 8 on CPU drivers; on GPUs 32 or 64, the count that divides a
// row's vec4s most evenly, or 128; see MatvecShape in variants.rs) each read one
// vec4<u32> of each of the workgroup's ROWS rows (variant: 4 or 8) per step (16 bytes:
// 8 fp16, 16 int8 or 32 nf4 weights), DEPTH steps (variant: 1 or 2) per iteration, and
// apply the weights of four rows at a time to each input vec4 they load, for TOKENS
// tokens. Bytes of weights in flight per thread, as written: the later steps' words of
// every row and the first step's words of one row quad are requested before the first
// multiply-add, (4 + ROWS x (DEPTH - 1)) x 16 = 64 bytes at depth 1, 128 or 192 at
// depth 2; an iteration reads ROWS x DEPTH x 16 = 64 to 256 bytes, none of whose loads
// depend on the arithmetic (a GPU compiler may issue them all up front). Each input
// load feeds 16 multiply-adds, each weight is read once per TOKENS tokens. Four rows
// per workgroup launch twice the workgroups (more of a big GPU's cores busy on narrow
// models); two steps deep raise the bytes each thread keeps in flight (for GPUs whose
// bandwidth needs more in flight than one step gives, at the cost of registers). A
// row's sums depend on neither: each thread adds
// its steps in the same order (the same arithmetic either way). The per-thread sums
// are reduced across the workgroup with subgroupAdd (SUBGROUPS) or a tree in
// workgroup memory. Rows past M and tokens past T are read clamped and not stored.

const WG: u32 = LANES;              // threads per workgroup (variant: 8, 32, 64 or 128)
const ROWS: u32 = MATVEC_ROWS;      // rows per workgroup (variant: 4 or 8)
const DEPTH: u32 = MATVEC_DEPTH;    // steps per iteration, the later ones loaded first (variant: 1 or 2)
const QUADS: u32 = ROWS / 4u;       // vec4 sums per token
const TOKENS: u32 = TOKEN_BLOCK;    // tokens per pass over the weights (variant)
const SUMS: u32 = QUADS * TOKENS;   // per-thread sums

alias Sums = array<vec4<f32>, SUMS>;     // [token][row quad]: rows 4r .. 4r + 3
alias Part = array<vec4<f32>, TOKENS>;   // one row quad's sums over one vec4<u32> step
alias Words = array<vec4<u32>, 4>;       // one vec4<u32> of each of four rows
alias Batch = array<Words, QUADS * DEPTH>;  // [step][row quad] (step 0 unused)
alias Inputs = array<u32, TOKENS>;       // each token's first x vec4

// Four rows' vec4<u32> number q (rows clamped to the matrix).
fn load_rows(g: Group, row: u32, q: u32, words: u32) -> Words {
    let rows = min(vec4<u32>(row) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(g.m - 1u));
    let base = g.w_off / 4u + q;
    return Words(w[base + rows.x * words], w[base + rows.y * words], w[base + rows.z * words], w[base + rows.w * words]);
}

// The words of the steps after the first in an iteration (q + WG, ..., q + (DEPTH - 1)
// WG) of the workgroup's rows, every load issued before any step's arithmetic: what a
// deeper workgroup keeps in flight. Steps past the row read its last vec4, unused.
fn load_later_steps(g: Group, row0: u32, q: u32, words: u32) -> Batch {
    var r: Batch;
    for (var d = 1u; d < DEPTH; d++) {
        for (var rq = 0u; rq < QUADS; rq++) {
            r[d * QUADS + rq] = load_rows(g, row0 + 4u * rq, min(q + d * WG, words - 1u), words);
        }
    }
    return r;
}

// Step d's words of the row quad at `row`: the first step's loaded as they are used (so
// that depth 1 keeps a quad's words alone live), the later steps' from `later`.
fn step_words(later: ptr<function, Batch>, d: u32, rq: u32, g: Group, row: u32, q: u32, words: u32) -> Words {
    if (d == 0u) {
        return load_rows(g, row, q, words);
    }
    return (*later)[d * QUADS + rq];
}

// The block scales of four rows at block `b` (quantized formats).
fn row_scales(g: Group, row: u32, b: u32) -> vec4<f32> {
    let rows = min(vec4<u32>(row) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(g.m - 1u));
    return vec4<f32>(block_scale(g, rows.x, b), block_scale(g, rows.y, b), block_scale(g, rows.z, b), block_scale(g, rows.w, b));
}

// Per format, one step: the 4 x 4 blocks of a vec4<u32> of four rows (transposed, so
// that block * x sums over the columns: component c is row c) times each token's
// inputs. The sub-step loops have constant bounds, so that they unroll.
fn step_16bit(g: Group, r: Words, xrow: Inputs, q: u32) -> Part {
    var part: Part;
    for (var t = 0u; t < TOKENS; t++) {
        part[t] = vec4<f32>(0.0);
    }
    for (var j = 0u; j < 2u; j++) {
        let a = 2u * j;
        let block = transpose(mat4x4<f32>(
            vec4<f32>(unpack_pair(g, r[0][a]), unpack_pair(g, r[0][a + 1u])),
            vec4<f32>(unpack_pair(g, r[1][a]), unpack_pair(g, r[1][a + 1u])),
            vec4<f32>(unpack_pair(g, r[2][a]), unpack_pair(g, r[2][a + 1u])),
            vec4<f32>(unpack_pair(g, r[3][a]), unpack_pair(g, r[3][a + 1u]))));
        for (var t = 0u; t < TOKENS; t++) {
            part[t] += block * x[xrow[t] + 2u * q + j];
        }
    }
    return part;
}

#ifdef HAS_INT8
fn step_int8(r: Words, xrow: Inputs, q: u32) -> Part {
    var part: Part;
    for (var t = 0u; t < TOKENS; t++) {
        part[t] = vec4<f32>(0.0);
    }
    for (var j = 0u; j < 4u; j++) {
        let block = transpose(mat4x4<f32>(unpack_int8(r[0][j]), unpack_int8(r[1][j]), unpack_int8(r[2][j]), unpack_int8(r[3][j])));
        for (var t = 0u; t < TOKENS; t++) {
            part[t] += block * x[xrow[t] + 4u * q + j];
        }
    }
    return part;
}
#endif

#ifdef HAS_NF4
fn step_nf4(r: Words, xrow: Inputs, q: u32) -> Part {
    var part: Part;
    for (var t = 0u; t < TOKENS; t++) {
        part[t] = vec4<f32>(0.0);
    }
    for (var j = 0u; j < 8u; j++) {
        let block = transpose(mat4x4<f32>(unpack_nf4(r[0], j), unpack_nf4(r[1], j), unpack_nf4(r[2], j), unpack_nf4(r[3], j)));
        for (var t = 0u; t < TOKENS; t++) {
            part[t] += block * x[xrow[t] + 8u * q + j];
        }
    }
    return part;
}
#endif

// One row quad's part of a step, scaled, into the thread's sums.
fn add_part(sums: ptr<function, Sums>, rq: u32, part: Part, scale: vec4<f32>) {
    for (var t = 0u; t < TOKENS; t++) {
        (*sums)[t * QUADS + rq] += part[t] * scale;
    }
}

// This thread's partial sums for tokens t0 .. t0 + TOKENS - 1 of rows row0 .. row0 +
// ROWS - 1: one loop per format, the branch outside it (inside, a CPU driver that runs
// both sides of a branch under a lane mask paid for every format's step each time).
fn matvec_sums(g: Group, row0: u32, t0: u32, lane: u32) -> Sums {
    var sums: Sums;
    for (var i = 0u; i < SUMS; i++) {
        sums[i] = vec4<f32>(0.0);
    }
    var xrow: Inputs;
    for (var t = 0u; t < TOKENS; t++) {
        xrow[t] = (g.x_off + min(t0 + t, p.t - 1u) * g.x_stride) / 4u;
    }
    let f = format_of(g);
    let words = g.k / per_word4(g);     // vec4<u32> per row
    // Each loop: DEPTH steps per iteration, loaded together, then added in order of q.
#ifdef HAS_INT8
    if (f == FMT_INT8) {
        for (var q = lane; q < words; q += DEPTH * WG) {
            var later = load_later_steps(g, row0, q, words);
            for (var d = 0u; d < DEPTH; d++) {
                let qd = q + d * WG;
                for (var rq = 0u; rq < QUADS; rq++) {
                    if (d == 0u || qd < words) {
                        let row = row0 + 4u * rq;
                        let r = step_words(&later, d, rq, g, row, q, words);
                        add_part(&sums, rq, step_int8(r, xrow, qd), row_scales(g, row, qd / 4u));
                    }
                }
            }
        }
        return sums;
    }
#endif
#ifdef HAS_NF4
    if (f == FMT_NF4) {
        for (var q = lane; q < words; q += DEPTH * WG) {
            var later = load_later_steps(g, row0, q, words);
            for (var d = 0u; d < DEPTH; d++) {
                let qd = q + d * WG;
                for (var rq = 0u; rq < QUADS; rq++) {
                    if (d == 0u || qd < words) {
                        let row = row0 + 4u * rq;
                        let r = step_words(&later, d, rq, g, row, q, words);
                        add_part(&sums, rq, step_nf4(r, xrow, qd), row_scales(g, row, qd / 2u));
                    }
                }
            }
        }
        return sums;
    }
#endif
    for (var q = lane; q < words; q += DEPTH * WG) {
        var later = load_later_steps(g, row0, q, words);
        for (var d = 0u; d < DEPTH; d++) {
            let qd = q + d * WG;
            for (var rq = 0u; rq < QUADS; rq++) {
                if (d == 0u || qd < words) {
                    let r = step_words(&later, d, rq, g, row0 + 4u * rq, q, words);
                    add_part(&sums, rq, step_16bit(g, r, xrow, qd), vec4<f32>(1.0));
                }
            }
        }
    }
    return sums;
}

fn store_quad(g: Group, t: u32, row: u32, v: vec4<f32>) {
    if (t < p.t) {
        for (var e = 0u; e < 4u; e++) {
            if (row + e < g.m) {
                store(g, t, row + e, v[e]);
            }
        }
    }
}

#ifdef SUBGROUPS
// One row of sums per subgroup; subgroups have at least 4 lanes (WebGPU's minimum).
var<workgroup> sg_sums: array<array<vec4<f32>, SUMS>, WG / 4u>;
#else
var<workgroup> tree: array<array<vec4<f32>, 4>, WG>;
#endif

@compute @workgroup_size(LANES)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lane: u32,
#ifdef SUBGROUPS
          @builtin(subgroup_invocation_id) sg_lane: u32,
          @builtin(subgroup_id) sg: u32,
          @builtin(num_subgroups) n_sg: u32,
#endif
          ) {
#ifdef HAS_NF4
    load_nf4_table(lane);
#endif
    // Uniform per workgroup: every thread returns or none does.
    let at = locate(wid.y * nwg.x + wid.x, ROWS, 1u);
    if (at.group >= p.n_groups) {
        return;
    }
    let g = p.groups[at.group];
    let row0 = at.block * ROWS;
    for (var t0 = 0u; t0 < p.t; t0 += TOKENS) {
        let sums = matvec_sums(g, row0, t0, lane);
#ifdef SUBGROUPS
        for (var i = 0u; i < SUMS; i++) {
            let s = subgroupAdd(sums[i]);
            if (sg_lane == 0u) {
                sg_sums[sg][i] = s;
            }
        }
        workgroupBarrier();
        // (A loop: 8 lanes have fewer threads than 16 sums of 8 tokens.)
        for (var i = lane; i < SUMS; i += WG) {
            var v = vec4<f32>(0.0);
            for (var s = 0u; s < n_sg; s++) {
                v += sg_sums[s][i];
            }
            store_quad(g, t0 + i / QUADS, row0 + 4u * (i % QUADS), v);
        }
        workgroupBarrier();
#else
        // Four sums at a time through a fixed tree (bit-identical run to run).
        for (var i0 = 0u; i0 < SUMS; i0 += 4u) {
            for (var e = 0u; e < 4u; e++) {
                tree[lane][e] = sums[min(i0 + e, SUMS - 1u)];
            }
            workgroupBarrier();
            for (var s = WG / 2u; s > 0u; s = s >> 1u) {
                if (lane < s) {
                    for (var e = 0u; e < 4u; e++) {
                        tree[lane][e] += tree[lane + s][e];
                    }
                }
                workgroupBarrier();
            }
            if (lane < 4u && i0 + lane < SUMS) {
                let i = i0 + lane;
                store_quad(g, t0 + i / QUADS, row0 + 4u * (i % QUADS), tree[0][lane]);
            }
            workgroupBarrier();
        }
#endif
    }
}

