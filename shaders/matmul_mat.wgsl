// Matrix-matrix products for prefill chunks: 64x64 output tiles staged through
// workgroup memory. See matmul_common.wgsl for the groups, formats and flags.
#include "matmul_common.wgsl"

// ---- matmul_tiled: 16x16 threads, each computing 4 rows x 4 tokens of a 64x64 tile ----
//
// Both tiles are staged in their natural order, K innermost (w_tile[row][k],
// x_tile[token][k], as vec4s of four k), so that each thread's global loads land as whole
// vec4s; a row of KSTEP / 4 vec4s is padded by one, so that the 16 rows or tokens a
// quarter-warp reads are spread over all banks. Thread (x, y) owns rows x, x + 16,
// x + 32, x + 48 and tokens y, y + 16, ...: for one k quad it reads 4 + 4 vec4s and does
// 16 four-term dot products (64 multiply-adds); in its stores, 16 neighbouring threads
// write 16 consecutive outputs of one token. The next K step's weights and inputs are
// loaded into registers while the current one is computed (one step ahead), so global
// latency overlaps the arithmetic. Workgroup memory: 2 x 64 x 5 x 16 bytes = 10 KiB.
const TILE: u32 = 64u;
const KSTEP: u32 = 16u;
const KQ: u32 = 4u;      // KSTEP / 4: vec4s of a staged row
const KQ_PAD: u32 = 5u;  // with the bank padding
var<workgroup> w_tile: array<vec4<f32>, 320>;  // [TILE rows][KQ_PAD]
var<workgroup> x_tile: array<vec4<f32>, 320>;  // [TILE tokens][KQ_PAD]

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

// What one thread stages of one K step: up to eight weights and four inputs.
struct Staged {
    w: array<vec4<f32>, 2>,
    x: vec4<f32>,
}

// Thread li's share of the K step at k0. nn.Linear layout: threads 0..127 each read 8
// weights of one row (64 rows x 2 runs of 8); input-major, 8 outputs of one input
// (16 inputs x 8 runs of 8). Inputs: every thread 4 of one token (64 tokens x 4 quads).
fn load_step(g: Group, li: u32, m0: u32, t0: u32, k0: u32, input_major: bool) -> Staged {
    var s: Staged;
    s.w = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    if (li < 128u && input_major) {
        let kk = li / 8u;
        let r = 8u * (li % 8u);
        if (m0 + r < g.m && k0 + kk < g.k) {
            s.w = weights8(g, k0 + kk, m0 + r, g.m);
        }
    } else if (li < 128u) {
        let r = li / 2u;
        let kk = 8u * (li % 2u);
        if (m0 + r < g.m && k0 + kk < g.k) {
            s.w = weights8(g, m0 + r, k0 + kk, g.k);
        }
    }
    let tt = li / 4u;
    let kk = 4u * (li % 4u);
    s.x = vec4<f32>(0.0);
    if (t0 + tt < p.t && k0 + kk < g.k) {
        s.x = x[(g.x_off + (t0 + tt) * g.x_stride + k0 + kk) / 4u];
    }
    return s;
}

fn store_step(s: Staged, li: u32, input_major: bool) {
    if (li < 128u && input_major) {
        // Eight rows at one k: a column of the tile.
        let kk = li / 8u;
        let r = 8u * (li % 8u);
        for (var e = 0u; e < 8u; e++) {
            w_tile[(r + e) * KQ_PAD + kk / 4u][kk % 4u] = s.w[e / 4u][e % 4u];
        }
    } else if (li < 128u) {
        let r = li / 2u;
        let q = 2u * (li % 2u);
        w_tile[r * KQ_PAD + q] = s.w[0];
        w_tile[r * KQ_PAD + q + 1u] = s.w[1];
    }
    x_tile[(li / 4u) * KQ_PAD + li % 4u] = s.x;
}

@compute @workgroup_size(16, 16)
fn matmul_tiled(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let g = p.groups[wid.z];
#ifdef HAS_NF4
    load_nf4_table(li);
#endif
    let tiles_m = (g.m + TILE - 1u) / TILE;
    let tiles_t = (p.t + TILE - 1u) / TILE;
    let tile = wid.y * nwg.x + wid.x;
    if (tile >= tiles_m * tiles_t) {
        return;
    }
    let m0 = (tile % tiles_m) * TILE;
    let t0 = (tile / tiles_m) * TILE;

    var acc: array<vec4<f32>, 4>;  // acc[token j][row i]: row lid.x + 16 i, token lid.y + 16 j
    for (var j = 0u; j < 4u; j++) {
        acc[j] = vec4<f32>(0.0);
    }
    let input_major = (g.flags & INPUT_MAJOR) != 0u;
    var next = load_step(g, li, m0, t0, 0u, input_major);
    for (var k0 = 0u; k0 < g.k; k0 += KSTEP) {
        store_step(next, li, input_major);
        workgroupBarrier();
        if (k0 + KSTEP < g.k) {
            next = load_step(g, li, m0, t0, k0 + KSTEP, input_major);
        }
        for (var q = 0u; q < KQ; q++) {
            var wq: array<vec4<f32>, 4>;
            for (var i = 0u; i < 4u; i++) {
                wq[i] = w_tile[(lid.x + 16u * i) * KQ_PAD + q];
            }
            for (var j = 0u; j < 4u; j++) {
                let xq = x_tile[(lid.y + 16u * j) * KQ_PAD + q];
                acc[j] += vec4<f32>(dot(wq[0], xq), dot(wq[1], xq), dot(wq[2], xq), dot(wq[3], xq));
            }
        }
        workgroupBarrier();
    }
    for (var j = 0u; j < 4u; j++) {
        let t = t0 + lid.y + 16u * j;
        for (var i = 0u; i < 4u; i++) {
            let m = m0 + lid.x + 16u * i;
            if (t < p.t && m < g.m) {
                store(g, t, m, acc[j][i]);
            }
        }
    }
}
