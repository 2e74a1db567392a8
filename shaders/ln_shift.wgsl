// LayerNorm fused with the token shift that follows it in every block:
//   n[t] = (x[t] - mean) / sqrt(var + eps) * weight + bias
//   out[j, t] = n[t] + (n[t-1] - n[t]) * mix[j]          for the N_MIX mix vectors
// where n[t-1] of a sequence's first token is its slot's shift state, and the
// sequence's last normalised token becomes the new shift state. With KEEP_NORMALISED,
// n[t] itself is written too, as row N_MIX of `out` (DeepEmbed's channel mix reads it).
//
// One workgroup per token. It normalises its own row and, unless it is its sequence's
// first token, its predecessor's row too (recomputed: no workgroup waits for another).
// The workgroup of a sequence's first token owns that slot's shift state: each thread
// reads the old value of its channels and then writes the normalised last row there, so
// no other workgroup touches it. Row statistics: two passes (mean, then centred
// variance) for accuracy, reduced as a fixed tree (bit-identical run to run); the up
// to three rows a workgroup needs are reduced together.
//
// With FOLD, the product before this one (the previous layer's value projection, split
// along K across workgroups: see Split in src/model/ops.rs) left FOLD_PARTS partial sums
// of its output in `parts` instead of adding them to x: each token's row gets them added
// first, in part order (bit-identical run to run), and written back to x, the residual
// stream the rest of the layer adds to. The host folds only chunks whose every token is
// its sequence's first (decode), so the row a workgroup folds is the only one it reads
// and no other workgroup reads it.

struct Params {
    c: u32,            // channels
    t_total: u32,      // tokens in this chunk, all sequences together
    n_seq: u32,
    ln_w: u32,         // offsets in `consts` of the LayerNorm weight and bias
    ln_b: u32,
    mix_off: u32,      // offset of mix[0] in `consts`; mix[j] follows at + j * C
    state_off: u32,    // offset of this shift vector inside a slot of `state`
    slot_stride: u32,  // f32 elements per slot in `state`
    eps: f32,
    fold_parts: u32,   // FOLD: partial sums per element in `parts`
    fold_stride: u32,  // FOLD: f32 elements from one part to the next
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
#ifdef FOLD
@group(0) @binding(1) var<storage, read_write> x: array<f32>;      // (T, C) residual stream
@group(0) @binding(6) var<storage, read> parts: array<f32>;        // (fold_parts, T, C) at fold_stride
#else
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (T, C) residual stream
#endif
@group(0) @binding(2) var<storage, read> consts: array<f32>;       // packed f32 vectors
@group(0) @binding(3) var<storage, read> seqs: array<vec4<u32>>;   // (n_seq): first token, tokens, slot, -
@group(0) @binding(4) var<storage, read_write> state: array<f32>;  // (slots, slot_stride)
@group(0) @binding(5) var<storage, read_write> out: array<f32>;    // (N_MIX [+ 1], T, C)

const WG: u32 = 256u;
const MAX_SEQS: u32 = 64u;  // rows of the sequence table (src/model/scratch.rs MAX_SEQS)
var<workgroup> partial: array<vec3<f32>, WG>;

// Sums of v over the workgroup, per component.
fn workgroup_sum(lid: u32, v: vec3<f32>) -> vec3<f32> {
    partial[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            partial[lid] = partial[lid] + partial[lid + s];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

fn normalised(row: u32, c: u32, mean: f32, rstd: f32) -> f32 {
    return (x[row * p.c + c] - mean) * rstd * consts[p.ln_w + c] + consts[p.ln_b + c];
}

@compute @workgroup_size(256)
fn ln_shift(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let t = wid.y * nwg.x + wid.x;
    if (t >= p.t_total) {
        return;
    }
    // The loop's bound is a constant: with the bound p.n_seq, lavapipe (Mesa 22.3)
    // leaks about 30 KB of host memory per dispatch of this kernel.
    var seq = seqs[0];
    for (var s = 1u; s < MAX_SEQS; s++) {
        let q = seqs[s];
        if (s < p.n_seq && t >= q.x && t < q.x + q.y) {
            seq = q;
        }
    }
    let first = t == seq.x;
    // The rows this workgroup normalises: its own, its predecessor's (or, for a first
    // token, none: the state holds it), and the sequence's last (first token only).
    let rows = vec3<u32>(t, select(t - 1u, t, first), seq.x + seq.y - 1u);
    let inv_c = 1.0 / f32(p.c);
#ifdef FOLD
    // Each thread folds the channels it reads below: no barrier needed.
    for (var c = lid; c < p.c; c += WG) {
        var v = x[t * p.c + c];
        for (var j = 0u; j < p.fold_parts; j++) {
            v += parts[j * p.fold_stride + t * p.c + c];
        }
        x[t * p.c + c] = v;
    }
#endif

    var s = vec3<f32>(0.0);
    for (var c = lid; c < p.c; c += WG) {
        s += vec3<f32>(x[rows.x * p.c + c], x[rows.y * p.c + c], x[rows.z * p.c + c]);
    }
    let mean = workgroup_sum(lid, s) * inv_c;
    var q = vec3<f32>(0.0);
    for (var c = lid; c < p.c; c += WG) {
        let d = vec3<f32>(x[rows.x * p.c + c], x[rows.y * p.c + c], x[rows.z * p.c + c]) - mean;
        q += d * d;
    }
    let rstd = inverseSqrt(workgroup_sum(lid, q) * inv_c + p.eps);

    let at = seq.z * p.slot_stride + p.state_off;
    for (var c = lid; c < p.c; c += WG) {
        let cur = normalised(rows.x, c, mean.x, rstd.x);
        var prev: f32;
        if (first) {
            prev = state[at + c];
            state[at + c] = normalised(rows.z, c, mean.z, rstd.z);
        } else {
            prev = normalised(rows.y, c, mean.y, rstd.y);
        }
        let d = prev - cur;
        for (var j = 0u; j < N_MIX; j++) {
            out[(j * p.t_total + t) * p.c + c] = cur + d * consts[p.mix_off + j * p.c + c];
        }
#ifdef KEEP_NORMALISED
        out[(N_MIX * p.t_total + t) * p.c + c] = cur;
#endif
    }
}
