// Matrix-vector products for a few tokens (decode, small batches): see
// matmul_common.wgsl for the groups, formats and flags.
#include "matmul_common.wgsl"

// ---- matvec: ROWS rows per workgroup, every thread striding along K ----
//
// Each thread reads one vec4<u32> of each of its workgroup's ROWS rows per step (16
// bytes: 8 fp16, 16 int8 or 32 nf4 weights) and applies the weights of four rows at a
// time to each input vec4 it loads, for TOKENS tokens: per step ROWS x 16 = 128 bytes
// of weights in flight per thread in every format, each input load feeding 16
// multiply-adds, each weight read once per TOKENS tokens. The per-thread sums are
// reduced across the workgroup with subgroupAdd (SUBGROUPS) or a tree in workgroup
// memory. Rows past M and tokens past T are read clamped and not stored.

const WG: u32 = 64u;
const ROWS: u32 = 8u;
const QUADS: u32 = 2u;             // ROWS / 4: vec4 sums per token
const TOKENS: u32 = TOKEN_BLOCK;   // tokens per pass over the weights (variant)
const SUMS: u32 = QUADS * TOKENS;  // per-thread sums

alias Sums = array<vec4<f32>, SUMS>;  // [token][row quad]: rows 4r .. 4r + 3

// The 4 x 4 block of weights (4 rows, 4 columns) that sub-step j of a vec4<u32> holds,
// transposed so that block * x sums over the columns: column c of the result is row c.
fn block16(g: Group, r0: vec4<u32>, r1: vec4<u32>, r2: vec4<u32>, r3: vec4<u32>, j: u32) -> mat4x4<f32> {
    let f = format_of(g);
#ifdef HAS_INT8
    if (f == FMT_INT8) {
        return transpose(mat4x4<f32>(unpack_int8(r0[j]), unpack_int8(r1[j]), unpack_int8(r2[j]), unpack_int8(r3[j])));
    }
#endif
#ifdef HAS_NF4
    if (f == FMT_NF4) {
        return transpose(mat4x4<f32>(unpack_nf4(r0, j), unpack_nf4(r1, j), unpack_nf4(r2, j), unpack_nf4(r3, j)));
    }
#endif
    let a = 2u * j;
    return transpose(mat4x4<f32>(
        vec4<f32>(unpack_pair(g, r0[a]), unpack_pair(g, r0[a + 1u])),
        vec4<f32>(unpack_pair(g, r1[a]), unpack_pair(g, r1[a + 1u])),
        vec4<f32>(unpack_pair(g, r2[a]), unpack_pair(g, r2[a + 1u])),
        vec4<f32>(unpack_pair(g, r3[a]), unpack_pair(g, r3[a + 1u]))));
}

// This thread's partial sums for tokens t0 .. t0 + TOKENS - 1 of rows row0 .. row0 + ROWS - 1.
fn matvec_sums(g: Group, row0: u32, t0: u32, lane: u32) -> Sums {
    var sums: Sums;
    for (var i = 0u; i < SUMS; i++) {
        sums[i] = vec4<f32>(0.0);
    }
    let per = per_word4(g);
    let subs = per / 4u;               // 4-column blocks per vec4<u32>
    let words = g.k / per;             // vec4<u32> per row
    let quantized = format_of(g) >= FMT_INT8;
    var xrow: array<u32, TOKENS>;      // first x vec4 of each token
    for (var t = 0u; t < TOKENS; t++) {
        xrow[t] = (g.x_off + min(t0 + t, p.t - 1u) * g.k) / 4u;
    }
    for (var q = lane; q < words; q += WG) {
        for (var rq = 0u; rq < QUADS; rq++) {
            var rows = vec4<u32>(row0 + 4u * rq) + vec4<u32>(0u, 1u, 2u, 3u);
            rows = min(rows, vec4<u32>(g.m - 1u));
            let base = g.w_off / 4u + q;
            let w0 = w[base + rows.x * words];
            let w1 = w[base + rows.y * words];
            let w2 = w[base + rows.z * words];
            let w3 = w[base + rows.w * words];
            var part: array<vec4<f32>, TOKENS>;
            for (var t = 0u; t < TOKENS; t++) {
                part[t] = vec4<f32>(0.0);
            }
            for (var j = 0u; j < subs; j++) {
                let block = block16(g, w0, w1, w2, w3, j);
                for (var t = 0u; t < TOKENS; t++) {
                    part[t] += block * x[xrow[t] + q * subs + j];
                }
            }
            var scale = vec4<f32>(1.0);
            if (quantized) {
                let b = q * per / 64u;
                scale = vec4<f32>(block_scale(g, rows.x, b), block_scale(g, rows.y, b), block_scale(g, rows.z, b), block_scale(g, rows.w, b));
            }
            for (var t = 0u; t < TOKENS; t++) {
                sums[t * QUADS + rq] += part[t] * scale;
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
var<workgroup> sg_sums: array<array<vec4<f32>, SUMS>, 16>;
#else
var<workgroup> tree: array<array<vec4<f32>, 4>, WG>;
#endif

@compute @workgroup_size(64)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lane: u32,
#ifdef SUBGROUPS
          @builtin(subgroup_invocation_id) sg_lane: u32,
          @builtin(subgroup_id) sg: u32,
          @builtin(num_subgroups) n_sg: u32,
#endif
          ) {
    let g = p.groups[wid.z];
#ifdef HAS_NF4
    if (lane < 16u) {
        nf4[lane] = NF4_CODES[lane];
    }
    workgroupBarrier();
#endif
    // Uniform per workgroup: every thread returns or none does.
    let row0 = (wid.y * nwg.x + wid.x) * ROWS;
    if (row0 >= g.m) {
        return;
    }
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
        if (lane < SUMS) {
            var v = vec4<f32>(0.0);
            for (var s = 0u; s < n_sg; s++) {
                v += sg_sums[s][lane];
            }
            store_quad(g, t0 + lane / QUADS, row0 + 4u * (lane % QUADS), v);
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

