// RWKV-7a DeepEmbed: the channel mix's key activations scaled per token (rwkv7.md,
// DeepEmbed section):
//   ss[j]   = sum_i h[t, i] * se[t, i * R + j]          h = xf @ s1 [R], se = this layer's
//                                                       table row of the token, r x r
//   kf[t, f] *= s0[f] + sum_j s2t[f, j] * ss[j]         s2t = s2 transposed, [F, R]
// `se` arrives complete: the host uploads the table rows and a matmul has added
// s_emb_x @ (the normalised embedding) to them, which is the official load-time merge
// done per token.
//
// One workgroup per (token, 256 rows of F): its first R threads compute ss into workgroup
// memory (R^2 multiply-adds, repeated by each of the F / 256 workgroups of a token,
// cheaper than a dispatch of its own), then every thread scales its row.

struct Params {
    t: u32,        // tokens in the chunk
    f: u32,        // channel-mix width
    r: u32,        // modulation rank (at most MAX_RANK)
    se_off: u32,   // offset of this layer's (T, R * R) rows in `se`
    h_off: u32,    // offset of (T, R) h in `kf`'s buffer, after the (T, F) activations
    s2_off: u32,   // offset of s2t in `deep`
    _pad0: u32,
    _pad1: u32,
}

const MAX_RANK: u32 = 64u;
const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> se: array<f32>;          // (L, T, R * R)
@group(0) @binding(2) var<storage, read> deep: array<f32>;        // s0 (F), s2t (F, R)
@group(0) @binding(3) var<storage, read_write> kf: array<f32>;    // (T, F) key activations, then (T, R) h

var<workgroup> sh_ss: array<f32, MAX_RANK>;

@compute @workgroup_size(256)
fn deep_embed(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    if (lid < p.r) {
        var acc = 0.0;
        let row = p.se_off + t * p.r * p.r;
        for (var i = 0u; i < p.r; i++) {
            acc += kf[p.h_off + t * p.r + i] * se[row + i * p.r + lid];
        }
        sh_ss[lid] = acc;
    }
    workgroupBarrier();
    let f = wid.x * WG + lid;
    if (f >= p.f || t >= p.t) {
        return;
    }
    var g = deep[f];
    let w = p.s2_off + f * p.r;
    for (var j = 0u; j < p.r; j++) {
        g += deep[w + j] * sh_ss[j];
    }
    kf[t * p.f + f] *= g;
}
