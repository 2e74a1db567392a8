// Matrix-matrix products for prefill chunks on cooperative matrices (tensor cores,
// matrix cores): the same products as matmul_tiled (see matmul_common.wgsl for the
// groups, formats and flags), with f16 operands and f32 sums. The weights are exact in
// f16 (f16 matrices) or dequantized to it (int8, nf4; bf16 is not compiled: its values
// may exceed the f16 range), and the inputs are rounded to f16 (a relative error of
// 2^-11 each), so the sums differ from matmul_tiled's in the last bits of an f16, not of
// an f32. The host picks this kernel only after the model's own matrices passed a check
// against matmul_tiled at load (src/model/coop_check.rs).
//
// COOP_EMULATED (RWKV_GPU_COOP_EMULATE=1, for tests): the cooperative-matrix operations
// done by the subgroup's lanes in plain WGSL, with the semantics the real ones are used
// with here, so that the kernel's staging, tiling and stores run (and are checked
// against the SIMT kernel and the golden outputs) on devices without matrix units.
enable f16;
#ifndef COOP_EMULATED
enable wgpu_cooperative_matrix;
#endif
// naga checks that cooperative-matrix operations run in uniform control flow under the
// derivative-uniformity rule, and it counts every local variable (a loop counter, the
// group found below) as non-uniform. Here every branch and loop bound before such an
// operation depends on the workgroup id and the uniform parameters alone, so the
// check is turned off for this file rather than the code contorted around it.
diagnostic(off, derivative_uniformity);

#include "matmul_common.wgsl"

// ---- matmul_coop: subgroups of 32 rows x 64 tokens, (32 x subgroups) x 64 tiles ----
//
// The workgroup is 4 x SG_MIN threads (variant: the narrowest subgroup the device runs),
// so 4 subgroups, or 2 or 1 where the driver runs wider ones (subgroups may vary in
// size between 32 and 64 lanes on AMD): subgroup s owns rows 32 s .. 32 s + 31 and all 64
// tokens of the workgroup's tile, which is 32 x num_subgroups rows (the host sizes the
// grid for the widest subgroups; surplus workgroups return at once). Per K step of 16
// all threads stage the tile's weight rows and 64 tokens as f16 in workgroup memory
// (rows padded from 32 to 48 bytes, so that the eight 16-byte rows a matrix load reads
// at once fall in different banks); then each subgroup multiplies its two 16 x 16
// blocks of weights with the four 16 x 16 blocks of inputs into eight 16 x 16 f32 sums:
// 6 matrix loads from workgroup memory per 8 multiply-adds of 8192 FLOP. At the end
// each sum goes through the subgroup's slot of workgroup memory, where its lanes apply
// the activation and store (or add) what lies within the matrix and the chunk.
// Cooperative-matrix operations need uniform control flow: every loop bound and the
// early return depend on the workgroup, the subgroup count and the uniform parameters
// only (see the diagnostic above).
// Workgroup memory: 128 x 24 + 64 x 24 halves + 4 x 256 floats = 13 KiB.
const THREADS: u32 = 4u * SG_MIN;
const SG_ROWS: u32 = 32u;    // rows of a subgroup
const TILE_T: u32 = 64u;
const KSTEP: u32 = 16u;
const STRIDE: u32 = 24u;     // halves per staged row: 16 + 8 of padding
const QUADS: u32 = 256u;     // vec4s of inputs staged per K step: 64 x 16 / 4
var<workgroup> w_stage: array<f16, 3072>;   // [4 x SG_ROWS rows][STRIDE]
var<workgroup> x_stage: array<f16, 1536>;   // [TILE_T tokens][STRIDE]
var<workgroup> c_stage: array<f32, 1024>;   // [subgroup][16 tokens][16 rows]

// Stages the K step at k0: `rows` weight rows [row][k] and the inputs [token][k], zero
// past the matrix, the chunk and K.
fn stage(g: Group, li: u32, rows: u32, m0: u32, t0: u32, k0: u32) {
    // Runs of 8 weights: rows x 16 / 8.
    for (var run = li; run < 2u * rows; run += THREADS) {
        var v = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
#ifdef INPUT_MAJOR_W
        // Eight rows (outputs) at one k: stored row k0 + kk, columns m0 + r ..
        let kk = run / (rows / 8u);
        let r = 8u * (run % (rows / 8u));
        if (m0 + r < g.m && k0 + kk < g.k) {
            v = weights8(g, k0 + kk, m0 + r, g.m);
        }
        for (var i = 0u; i < 8u; i++) {
            w_stage[(r + i) * STRIDE + kk] = f16(v[i / 4u][i % 4u]);
        }
#else
        // Eight k of one row.
        let r = run / 2u;
        let kk = 8u * (run % 2u);
        if (m0 + r < g.m && k0 + kk < g.k) {
            v = weights8(g, m0 + r, k0 + kk, g.k);
        }
        let at = r * STRIDE + kk;
        for (var i = 0u; i < 8u; i++) {
            w_stage[at + i] = f16(v[i / 4u][i % 4u]);
        }
#endif
    }
    for (var quad = li; quad < QUADS; quad += THREADS) {
        let tt = quad / 4u;
        let kk = 4u * (quad % 4u);
        var v = vec4<f32>(0.0);
        if (t0 + tt < p.t && k0 + kk < g.k) {
            v = x[(g.x_off + (t0 + tt) * g.x_stride + k0 + kk) / 4u];
        }
        let at = tt * STRIDE + kk;
        for (var i = 0u; i < 4u; i++) {
            x_stage[at + i] = f16(v[i]);
        }
    }
}

#ifdef COOP_EMULATED
// A 16 x 16 f32 sum spread over the subgroup's `width` lanes: lane l holds elements
// l, l + width, .. in column-major order (element e: row e % 16, column e / 16).
const PER_LANE: u32 = 256u / SG_MIN;
alias Sum = array<f32, PER_LANE>;

// c + A B for the A block at a_at of w_stage (row-major: row m at a_at + m * stride)
// and the B block at b_at of x_stage (column-major: column n at b_at + n * stride).
fn multiply_add(a_at: u32, b_at: u32, stride: u32, c: Sum, lane: u32, width: u32) -> Sum {
    var out = c;
    for (var i = 0u; i < 256u / width; i++) {
        let e = lane + width * i;
        let a = a_at + (e % 16u) * stride;
        let b = b_at + (e / 16u) * stride;
        var s = 0.0;
        for (var k = 0u; k < 16u; k++) {
            s += f32(w_stage[a + k]) * f32(x_stage[b + k]);
        }
        out[i] += s;
    }
    return out;
}
#else
alias Sum = coop_mat16x16<f32, C>;
#endif

// Sum `c` (rows r0 .., tokens tt0 .. of the tile) out through subgroup `sg`'s slot:
// lane l of `width` stores elements l, l + width, ... of the 16 x 16 block (column-major:
// token by token). Every thread calls it (it holds the barriers).
fn store_block(g: Group, c: Sum, sg: u32, lane: u32, width: u32, m0: u32, t0: u32, r0: u32, tt0: u32) {
    let slot = sg * 256u;
#ifdef COOP_EMULATED
    for (var i = 0u; i < 256u / width; i++) {
        c_stage[slot + lane + width * i] = c[i];
    }
#else
    let column = 16u;
    coopStore(c, &c_stage[slot], column);
#endif
    workgroupBarrier();
    for (var e = lane; e < 256u; e += width) {
        let m = m0 + r0 + e % 16u;
        let t = t0 + tt0 + e / 16u;
        if (m < g.m && t < p.t) {
            store(g, t, m, c_stage[slot + e]);
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(THREADS)
fn matmul_coop(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32,
               @builtin(subgroup_id) sg: u32,
               @builtin(num_subgroups) n_sg: u32,
               @builtin(subgroup_invocation_id) lane: u32,
               @builtin(subgroup_size) width: u32) {
#ifdef HAS_NF4
    load_nf4_table(li);
#endif
    let rows = SG_ROWS * n_sg;
    let at = locate(wid.y * nwg.x + wid.x, rows, (p.t + TILE_T - 1u) / TILE_T);
    if (at.group >= p.n_groups) {
        return;
    }
    let g = p.groups[at.group];
    let tiles_m = (g.m + rows - 1u) / rows;
    let m0 = (at.block % tiles_m) * rows;
    let t0 = (at.block / tiles_m) * TILE_T;

    // c<i><j>: rows 32 sg + 16 i .., tokens 16 j .. of the tile. Every index and stride
    // is a `let` of its own.
    var c00 = Sum();
    var c01 = Sum();
    var c02 = Sum();
    var c03 = Sum();
    var c10 = Sum();
    var c11 = Sum();
    var c12 = Sum();
    var c13 = Sum();
    let stride = STRIDE;
    let a0_at = (SG_ROWS * sg) * STRIDE;
    let a1_at = (SG_ROWS * sg + 16u) * STRIDE;
    let b0_at = 0u;
    let b1_at = 16u * STRIDE;
    let b2_at = 32u * STRIDE;
    let b3_at = 48u * STRIDE;
    for (var k0 = 0u; k0 < g.k; k0 += KSTEP) {
        stage(g, li, rows, m0, t0, k0);
        workgroupBarrier();
        // Weights row-major (row m at m * STRIDE), inputs column-major (token t's k run
        // at t * STRIDE).
#ifdef COOP_EMULATED
        c00 = multiply_add(a0_at, b0_at, stride, c00, lane, width);
        c01 = multiply_add(a0_at, b1_at, stride, c01, lane, width);
        c02 = multiply_add(a0_at, b2_at, stride, c02, lane, width);
        c03 = multiply_add(a0_at, b3_at, stride, c03, lane, width);
        c10 = multiply_add(a1_at, b0_at, stride, c10, lane, width);
        c11 = multiply_add(a1_at, b1_at, stride, c11, lane, width);
        c12 = multiply_add(a1_at, b2_at, stride, c12, lane, width);
        c13 = multiply_add(a1_at, b3_at, stride, c13, lane, width);
#else
        let a0 = coopLoadT<coop_mat16x16<f16, A>>(&w_stage[a0_at], stride);
        let a1 = coopLoadT<coop_mat16x16<f16, A>>(&w_stage[a1_at], stride);
        let b0 = coopLoad<coop_mat16x16<f16, B>>(&x_stage[b0_at], stride);
        let b1 = coopLoad<coop_mat16x16<f16, B>>(&x_stage[b1_at], stride);
        let b2 = coopLoad<coop_mat16x16<f16, B>>(&x_stage[b2_at], stride);
        let b3 = coopLoad<coop_mat16x16<f16, B>>(&x_stage[b3_at], stride);
        c00 = coopMultiplyAdd(a0, b0, c00);
        c01 = coopMultiplyAdd(a0, b1, c01);
        c02 = coopMultiplyAdd(a0, b2, c02);
        c03 = coopMultiplyAdd(a0, b3, c03);
        c10 = coopMultiplyAdd(a1, b0, c10);
        c11 = coopMultiplyAdd(a1, b1, c11);
        c12 = coopMultiplyAdd(a1, b2, c12);
        c13 = coopMultiplyAdd(a1, b3, c13);
#endif
        workgroupBarrier();
    }
    let r0 = SG_ROWS * sg;
    let r1 = SG_ROWS * sg + 16u;
    store_block(g, c00, sg, lane, width, m0, t0, r0, 0u);
    store_block(g, c01, sg, lane, width, m0, t0, r0, 16u);
    store_block(g, c02, sg, lane, width, m0, t0, r0, 32u);
    store_block(g, c03, sg, lane, width, m0, t0, r0, 48u);
    store_block(g, c10, sg, lane, width, m0, t0, r1, 0u);
    store_block(g, c11, sg, lane, width, m0, t0, r1, 16u);
    store_block(g, c12, sg, lane, width, m0, t0, r1, 32u);
    store_block(g, c13, sg, lane, width, m0, t0, r1, 48u);
}
