// Token shift: mixes each token's normalised input with the previous token's,
// out[j, t] = x[t] + (x[t-1] - x[t]) * mix[j], for N_MIX mix vectors at once.
// The previous token of a sequence's first token is the shift state of its slot; the
// last token's input becomes the new shift state. One thread walks one channel of one
// sequence in token order, so reading and updating the state never race.

struct Params {
    c: u32,            // channels
    t_total: u32,      // tokens in this chunk, all sequences together
    n_seq: u32,
    mix_off: u32,      // offset of mix[0] in `consts`; mix[j] follows at + j * C
    state_off: u32,    // offset of this shift vector inside a slot of `state`
    slot_stride: u32,  // f32 elements per slot in `state`
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (T, C)
@group(0) @binding(2) var<storage, read> consts: array<f32>;       // packed f32 vectors
@group(0) @binding(3) var<storage, read> seqs: array<vec4<u32>>;   // (n_seq): first token, tokens, slot, -
@group(0) @binding(4) var<storage, read_write> state: array<f32>;  // (slots, slot_stride)
@group(0) @binding(5) var<storage, read_write> out: array<f32>;    // (N_MIX, T, C)

@compute @workgroup_size(64)
fn token_shift(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let s = gid.y;
    if (c >= p.c || s >= p.n_seq) {
        return;
    }
    let seq = seqs[s];
    let at = seq.z * p.slot_stride + p.state_off + c;
    var prev = state[at];
    for (var t = seq.x; t < seq.x + seq.y; t++) {
        let cur = x[t * p.c + c];
        let d = prev - cur;
        for (var j = 0u; j < N_MIX; j++) {
            out[(j * p.t_total + t) * p.c + c] = cur + d * consts[p.mix_off + j * p.c + c];
        }
        prev = cur;
    }
    state[at] = prev;
}
