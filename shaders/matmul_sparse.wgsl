// Sparse matrix-vector products for a few tokens: the channel mix's value projection in
// decode. Its inputs are squared ReLUs, mostly exactly zero on trained models (94% of
// them, 80% of aligned groups of four, on the trained model in tests/data), so the
// matrix is stored input-major (flag INPUT_MAJOR: [K rows, M wide], each input's
// weights side by side) and a group of four inputs that is zero for every token of the
// pass is skipped: its four rows are never read. Dense inputs give the dense product
// (the same bytes read, in a different order). See matmul_common.wgsl for groups,
// formats and flags; quantized blocks here run along M.
#include "matmul_common.wgsl"

// ---- matvec_sparse: COLS x KLANES threads, each with 8 outputs of TOKENS tokens ----
//
// Thread (kl, cl) owns outputs 8 * (COLS * workgroup + cl) .. + 7 and the groups of
// four inputs kl, kl + KLANES, ...: for each group that has a non-zero input it reads
// four rows' 8 weights (fp16 16 bytes a row, int8 8, nf4 4: per group 64 / 32 / 16
// bytes in flight per thread), scaling each input by its row's block scale once. The
// COLS threads next to each other read one row's 64 (fp16) contiguous bytes. The
// KLANES partial sums of each output are added in workgroup memory in a fixed order
// (bit-identical run to run). Tokens past T are read clamped and not stored.

const COLS: u32 = 4u;
const KLANES: u32 = 64u;
const WG: u32 = 256u;               // COLS * KLANES
const OUTS: u32 = 32u;              // outputs per workgroup: COLS * 8
const TOKENS: u32 = TOKEN_BLOCK;    // tokens per pass over the live rows (variant)

alias Sums = array<vec4<f32>, 2 * TOKENS>;  // [token][half]: one thread's 8 outputs
alias Inputs = array<vec4<f32>, TOKENS>;    // one group's four inputs, per token

var<workgroup> partial: array<array<vec4<f32>, 2>, WG>;

#ifdef COUNT_READS
// Four counters per product from p.count_at: groups read, groups, non-zero inputs,
// inputs (of real tokens); counted by the first workgroup's first column.
@group(0) @binding(5) var<storage, read_write> counts: array<atomic<u32>>;
#endif

// Eight weights of stored row `row` from output `c0` (a multiple of 8), dequantized
// but not scaled.
fn row8(g: Group, f: u32, row: u32, c0: u32) -> array<vec4<f32>, 2> {
    switch (f) {
#ifdef HAS_INT8
        case FMT_INT8: {
            let word = g.w_off + row * (g.m / 4u) + c0 / 4u;
            return array<vec4<f32>, 2>(unpack_int8(scales[word]), unpack_int8(scales[word + 1u]));
        }
#endif
#ifdef HAS_NF4
        case FMT_NF4: {
            let word = scales[g.w_off + row * (g.m / 8u) + c0 / 8u];
            return array<vec4<f32>, 2>(unpack_nf4(vec4<u32>(word, 0u, 0u, 0u), 0u), unpack_nf4(vec4<u32>(word, 0u, 0u, 0u), 1u));
        }
#endif
        default: {
            let v = w[g.w_off / 4u + row * (g.m / 8u) + c0 / 8u];
            return array<vec4<f32>, 2>(vec4<f32>(unpack_pair(g, v.x), unpack_pair(g, v.y)), vec4<f32>(unpack_pair(g, v.z), unpack_pair(g, v.w)));
        }
    }
}

@compute @workgroup_size(256)
fn matvec_sparse(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
#ifdef HAS_NF4
    load_nf4_table(li);
#endif
    let cl = li % COLS;
    let kl = li / COLS;
    // Uniform per workgroup: every thread returns or none does.
    let at = locate(wid.y * nwg.x + wid.x, OUTS, 1u);
    if (at.group >= p.n_groups) {
        return;
    }
    let g = p.groups[at.group];
    let slice = at.block;
    let c0 = slice * OUTS + 8u * cl;
    // Columns past M (M is a multiple of 8) read the last 8 and store nothing.
    let c = min(c0, g.m - 8u);
    let f = format_of(g);
    let groups = g.k / 4u;
#ifdef COUNT_READS
    let counting = slice == 0u && cl == 0u;
    var n_read = 0u;
    var n_groups = 0u;
    var n_nonzero = 0u;
    var n_inputs = 0u;
#endif
    for (var t0 = 0u; t0 < p.t; t0 += TOKENS) {
        var sums: Sums;
        for (var i = 0u; i < 2u * TOKENS; i++) {
            sums[i] = vec4<f32>(0.0);
        }
        var xrow: array<u32, TOKENS>;
        for (var t = 0u; t < TOKENS; t++) {
            xrow[t] = (g.x_off + min(t0 + t, p.t - 1u) * g.x_stride) / 4u;
        }
        for (var q = kl; q < groups; q += KLANES) {
            var xs: Inputs;
            var live = false;
            for (var t = 0u; t < TOKENS; t++) {
                xs[t] = x[xrow[t] + q];
                live = live || any(xs[t] != vec4<f32>(0.0));
            }
#ifdef COUNT_READS
            if (counting) {
                n_groups += 1u;
                n_read += u32(live);
                for (var t = 0u; t < TOKENS; t++) {
                    if (t0 + t < p.t) {
                        n_nonzero += dot(vec4<u32>(xs[t] != vec4<f32>(0.0)), vec4<u32>(1u));
                        n_inputs += 4u;
                    }
                }
            }
#endif
            if (!live) {
                continue;
            }
            let row = 4u * q;
            if (f >= FMT_INT8) {
                let block = c / 64u;
                let s = vec4<f32>(block_scale_w(g, row, block, g.m), block_scale_w(g, row + 1u, block, g.m),
                                  block_scale_w(g, row + 2u, block, g.m), block_scale_w(g, row + 3u, block, g.m));
                for (var t = 0u; t < TOKENS; t++) {
                    xs[t] *= s;
                }
            }
            for (var i = 0u; i < 4u; i++) {
                let wr = row8(g, f, row + i, c);
                for (var t = 0u; t < TOKENS; t++) {
                    sums[2u * t] += wr[0] * xs[t][i];
                    sums[2u * t + 1u] += wr[1] * xs[t][i];
                }
            }
        }
        // Each token's partial sums, added across the KLANES threads of each output.
        for (var t = 0u; t < TOKENS; t++) {
            partial[li] = array<vec4<f32>, 2>(sums[2u * t], sums[2u * t + 1u]);
            workgroupBarrier();
            if (li < OUTS) {
                let col = li / 8u;         // which column thread's outputs
                let e = li % 8u;
                var v = 0.0;
                for (var l = 0u; l < KLANES; l++) {
                    v += partial[l * COLS + col][e / 4u][e % 4u];
                }
                let m = slice * OUTS + li;
                if (t0 + t < p.t && m < g.m) {
                    store(g, t0 + t, m, v);
                }
            }
            workgroupBarrier();
        }
    }
#ifdef COUNT_READS
    if (counting) {
        atomicAdd(&counts[p.count_at], n_read);
        atomicAdd(&counts[p.count_at + 1u], n_groups);
        atomicAdd(&counts[p.count_at + 2u], n_nonzero);
        atomicAdd(&counts[p.count_at + 3u], n_inputs);
    }
#endif
}
