// Matrix-matrix products for prefill chunks: 64x64 output tiles staged through
// workgroup memory. See matmul_common.wgsl for the groups, formats and flags.
#include "matmul_common.wgsl"

// ---- matmul_tiled: 16x16 threads, each computing 4 rows x 4 tokens of a 64x64 tile ----

// The tiles hold quads (four rows, four tokens) so that the inner loop reads one vec4
// of each per step: two loads for 16 multiply-adds.
const TILE: u32 = 64u;
const TQUADS: u32 = 16u;  // TILE / 4
const KSTEP: u32 = 16u;
var<workgroup> w_tile: array<vec4<f32>, 256>;  // [KSTEP][TILE / 4 row quads]
var<workgroup> x_tile: array<vec4<f32>, 256>;  // [KSTEP][TILE / 4 token quads]

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

    var acc: array<vec4<f32>, 4>;  // acc[token][row]
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    let input_major = (g.flags & INPUT_MAJOR) != 0u;
    for (var k0 = 0u; k0 < g.k; k0 += KSTEP) {
        // Weights, by the first 128 threads: 64 rows x 2 runs of 8 columns, one run each;
        // input-major, 16 inputs x 8 runs of 8 outputs (two row quads of the tile).
        if (li < 128u && input_major) {
            let kk = li / 8u;
            let r = 8u * (li % 8u);
            var v = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
            if (m0 + r < g.m && k0 + kk < g.k) {
                v = weights8(g, k0 + kk, m0 + r, g.m);
            }
            w_tile[kk * TQUADS + r / 4u] = v[0];
            w_tile[kk * TQUADS + r / 4u + 1u] = v[1];
        } else if (li < 128u) {
            let r = li / 2u;
            let kk = 8u * (li % 2u);
            var v = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
            if (m0 + r < g.m && k0 + kk < g.k) {
                v = weights8(g, m0 + r, k0 + kk, g.k);
            }
            for (var e = 0u; e < 8u; e++) {
                w_tile[(kk + e) * TQUADS + r / 4u][r % 4u] = v[e / 4u][e % 4u];
            }
        }
        // Inputs: 64 tokens x 16 columns, one vec4 per thread.
        {
            let tt = li / 4u;
            let kk = 4u * (li % 4u);
            var v = vec4<f32>(0.0);
            if (t0 + tt < p.t && k0 + kk < g.k) {
                v = x[(g.x_off + (t0 + tt) * g.x_stride + k0 + kk) / 4u];
            }
            for (var e = 0u; e < 4u; e++) {
                x_tile[(kk + e) * TQUADS + tt / 4u][tt % 4u] = v[e];
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KSTEP; kk++) {
            let wr = w_tile[kk * TQUADS + lid.y];
            let xv = x_tile[kk * TQUADS + lid.x];
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
