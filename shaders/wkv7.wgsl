// The RWKV-7 time-mix core: per token, with vectors over one head's channels
// (j = key index, i = value index):
//   w  = exp(-exp(-0.5) * sigmoid(w0 + w_lora))       a = sigmoid(a0 + a_lora)
//   kk = normalise(k * k_k)                           k = k * (1 + (a - 1) * k_a)
//   v  = layer 0 ? v (and v_first = v) : v + (v_first - v) * sigmoid(v0 + v_lora)
//   S[i, j] = S[i, j] * w[j] - (S[i, :] . kk) * kk[j] * a[j] + v[i] * k[j]
//   y[i] = S[i, :] . r
//   out = (GroupNorm(y) + (r . (k * r_k)) * v) * g
// HEAD_SIZE (preprocessor constant) is N, the workgroup size: one thread per channel.
//
// Two ways to run it, chosen by the host (src/model/ops.rs, `wkv`):
// - STAGE_WHOLE, for decode and batches of a few tokens per sequence: one kernel, one
//   workgroup per (head, sequence), token after token. With FUSED_LORA it also computes
//   the low-rank second stages (w, a, v, g) from the tokens' hidden values: thread i
//   takes the dot products of row i of each second-stage matrix with the hidden values
//   staged in workgroup memory, which saves a dispatch per layer where the dispatches'
//   fixed cost dominates. Per token: three head reductions (kk's norm; GroupNorm's mean
//   with the bonus; its variance).
// - Three passes for long chunks (prefill), so that the sequential part is only the
//   recurrence: STAGE_PREPARE (one workgroup per (head, token), all in parallel) turns
//   r, k, v and the low-rank outputs into the vectors the recurrence reads, in place;
//   STAGE_RECURRENCE (one workgroup per (head, sequence)) holds the head's state in
//   registers (thread i owns row i) and stages TOKEN_BLOCK tokens' vectors in workgroup
//   memory at a time, two barriers per block; STAGE_FINISH (per (head, token) again)
//   applies GroupNorm, the bonus and the gate.
// The state is read once and written once per chunk either way.

struct Params {
    c: u32,            // channels (heads * N)
    t_total: u32,      // tokens in this chunk, all sequences
    n_seq: u32,
    first_layer: u32,  // 1 in block 0: v is stored as v_first instead of mixed with it
    slot_stride: u32,  // f32 elements per slot in `state`
    wkv_off: u32,      // offset of the WKV matrix inside a slot
    w0: u32,           // offsets of the per-layer vectors in `consts`
    a0: u32,
    v0: u32,
    k_k: u32,
    k_a: u32,
    r_k: u32,
    lnx_w: u32,
    lnx_b: u32,
    eps: f32,          // GroupNorm epsilon
    mid_off: u32,      // FUSED_LORA: offset of the low-rank hidden values in `proj`
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
    // FUSED_LORA: per second-stage matrix (w, a, v, g): its width (0 for v in block 0),
    // the offset of its hidden values in `proj` relative to mid_off ((T, width) each),
    // and its first weight word (f16 pairs, rows of width / 2 words).
    lora_k: vec4<u32>,
    lora_mid: vec4<u32>,
    lora_w: vec4<u32>,
}

@group(0) @binding(0) var<uniform> p: Params;

#ifdef STAGE_WHOLE
@group(0) @binding(1) var<storage, read> proj: array<f32>;         // (3, T, C): r, k, v; FUSED_LORA: then the low-rank hidden values
#ifdef FUSED_LORA
@group(0) @binding(2) var<storage, read> weights: array<vec4<u32>>; // the layer's second-stage matrices, f16
#else
@group(0) @binding(2) var<storage, read> lora: array<f32>;         // (4, T, C): w, a, v, g low-rank outputs
#endif
@group(0) @binding(3) var<storage, read> consts: array<f32>;       // packed per-layer vectors
@group(0) @binding(4) var<storage, read> seqs: array<vec4<u32>>;   // (n_seq): first token, tokens, slot, -
@group(0) @binding(5) var<storage, read_write> v_first: array<f32>; // (T, C)
@group(0) @binding(6) var<storage, read_write> state: array<f32>;  // (slots, slot_stride)
@group(0) @binding(7) var<storage, read_write> out: array<f32>;    // (T, C)
#endif

#ifdef STAGE_PREPARE
@group(0) @binding(1) var<storage, read_write> proj: array<f32>;   // (3, T, C): r, k, v in; r, k (scaled by k_a), v (mixed) out
@group(0) @binding(2) var<storage, read_write> lora: array<f32>;   // (4, T, C): w, a, v, g low-rank outputs in; decay, kk, kk * a, g out
@group(0) @binding(3) var<storage, read> consts: array<f32>;       // packed per-layer vectors
@group(0) @binding(4) var<storage, read_write> v_first: array<f32>; // (T, C)
#endif

#ifdef STAGE_RECURRENCE
@group(0) @binding(1) var<storage, read> proj: array<f32>;         // (3, T, C): r, k, v as STAGE_PREPARE left them
@group(0) @binding(2) var<storage, read> lora: array<f32>;         // (4, T, C): decay, kk, kk * a, g
@group(0) @binding(3) var<storage, read> seqs: array<vec4<u32>>;   // (n_seq): first token, tokens, slot, -
@group(0) @binding(4) var<storage, read_write> state: array<f32>;  // (slots, slot_stride)
@group(0) @binding(5) var<storage, read_write> out: array<f32>;    // (T, C): y = S r
#endif

#ifdef STAGE_FINISH
@group(0) @binding(1) var<storage, read> proj: array<f32>;         // (3, T, C): r, k, v as STAGE_PREPARE left them
@group(0) @binding(2) var<storage, read> lora: array<f32>;         // (4, T, C): decay, kk, kk * a, g
@group(0) @binding(3) var<storage, read> consts: array<f32>;       // packed per-layer vectors
@group(0) @binding(4) var<storage, read_write> out: array<f32>;    // (T, C): y in, the gated output out
#endif

const N: u32 = HEAD_SIZE;
const DECAY_SCALE: f32 = -0.6065306597126334;  // -exp(-0.5)

const Q: u32 = N / 4u;  // vec4s per head vector

fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

// Two sums over the head's N threads at once: one exchange through workgroup memory,
// then every thread adds all N terms itself in the same order (the same result
// everywhere); two barriers, against 2 + log2(N) for a tree.
var<workgroup> red_x: array<vec4<f32>, Q>;
var<workgroup> red_y: array<vec4<f32>, Q>;

fn head_sums(i: u32, v: vec2<f32>) -> vec2<f32> {
    workgroupBarrier();  // the previous sum's reads are done
    red_x[i / 4u][i % 4u] = v.x;
    red_y[i / 4u][i % 4u] = v.y;
    workgroupBarrier();
    var x = vec4<f32>(0.0);
    var y = vec4<f32>(0.0);
    for (var q = 0u; q < Q; q++) {
        x += red_x[q];
        y += red_y[q];
    }
    let ones = vec4<f32>(1.0);
    return vec2<f32>(dot(x, ones), dot(y, ones));
}

fn head_sum(i: u32, v: f32) -> f32 {
    return head_sums(i, vec2<f32>(v, 0.0)).x;
}

#ifndef STAGE_RECURRENCE
// The head's GroupNorm of y, plus the bonus times v, times the gate.
fn finish(i: u32, c: u32, y: f32, bonus_term: f32, v: f32, g: f32) -> f32 {
    let sums = head_sums(i, vec2<f32>(y, bonus_term));
    let d = y - sums.x / f32(N);
    let variance = head_sum(i, d * d) / f32(N);
    let yn = d * inverseSqrt(variance + p.eps) * consts[p.lnx_w + c] + consts[p.lnx_b + c];
    return (yn + sums.y * v) * g;
}
#endif

#ifndef STAGE_RECURRENCE
#ifndef STAGE_FINISH
// The vectors of one token on channel c, from its r/k/v and low-rank outputs; the
// norm of kk is a head reduction, so every thread of the workgroup calls this.
struct Prepared {
    w: f32,   // decay
    kk: f32,  // normalised k * k_k
    a: f32,   // in-context learning rate
    k: f32,   // k scaled by k_a
    v: f32,   // v mixed with v_first (layer 0: v)
}

fn prepare(i: u32, c: u32, at: u32, k_in: f32, v_in: f32, lora_w: f32, lora_a: f32, lora_v: f32) -> Prepared {
    var x: Prepared;
    x.w = exp(DECAY_SCALE * sigmoid(consts[p.w0 + c] + lora_w));
    x.a = sigmoid(consts[p.a0 + c] + lora_a);
    let kk_raw = k_in * consts[p.k_k + c];
    x.kk = kk_raw / max(sqrt(head_sum(i, kk_raw * kk_raw)), 1e-12);
    x.k = k_in * (1.0 + (x.a - 1.0) * consts[p.k_a + c]);
    if (p.first_layer == 1u) {
        v_first[at] = v_in;
        x.v = v_in;
    } else {
        x.v = v_in + (v_first[at] - v_in) * sigmoid(consts[p.v0 + c] + lora_v);
    }
    return x;
}
#endif
#endif

#ifndef STAGE_PREPARE
#ifndef STAGE_FINISH

// Row i of a head's state (thread i's), as vec4s: keys 4q .. 4q + 3 in S[q].
fn load_state(row: u32) -> array<vec4<f32>, Q> {
    var S: array<vec4<f32>, Q>;
    for (var q = 0u; q < Q; q++) {
        S[q] = vec4<f32>(state[row + 4u * q], state[row + 4u * q + 1u], state[row + 4u * q + 2u], state[row + 4u * q + 3u]);
    }
    return S;
}

fn store_state(row: u32, S: array<vec4<f32>, Q>) {
    for (var q = 0u; q < Q; q++) {
        for (var e = 0u; e < 4u; e++) {
            state[row + 4u * q + e] = S[q][e];
        }
    }
}
#endif
#endif

#ifdef STAGE_WHOLE
// This token's vectors, as vec4s so that each read serves four keys.
var<workgroup> sh_r: array<vec4<f32>, Q>;
var<workgroup> sh_w: array<vec4<f32>, Q>;
var<workgroup> sh_k: array<vec4<f32>, Q>;
var<workgroup> sh_kk: array<vec4<f32>, Q>;
var<workgroup> sh_kka: array<vec4<f32>, Q>;
#ifdef FUSED_LORA
var<workgroup> sh_mid: array<vec4<f32>, 512>;  // one token's hidden values: w, a, v, g back to back
#endif
var<workgroup> seq_first: u32;
var<workgroup> seq_len: u32;

#ifdef FUSED_LORA
// Row c of second-stage matrix m (0 w, 1 a, 2 v, 3 g) times the staged hidden values.
fn lora_row(m: u32, c: u32, sh0: u32) -> f32 {
    let words = p.lora_k[m] / 8u;
    let row = p.lora_w[m] / 4u + c * words;
    var acc = 0.0;
    for (var q = 0u; q < words; q++) {
        let v = weights[row + q];
        acc += dot(vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)), sh_mid[sh0 / 4u + 2u * q])
             + dot(vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w)), sh_mid[sh0 / 4u + 2u * q + 1u]);
    }
    return acc;
}
#endif

@compute @workgroup_size(HEAD_SIZE)
fn wkv7(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) i: u32) {
    let h = wid.x;
    let s = wid.y;
    let seq = seqs[s];
    if (i == 0u) {
        seq_first = seq.x;
        seq_len = seq.y;
    }
    let first = workgroupUniformLoad(&seq_first);
    let count = workgroupUniformLoad(&seq_len);

    let tc = p.t_total * p.c;
    let c = h * N + i;
    let row = seq.z * p.slot_stride + p.wkv_off + c * N;
    var S = load_state(row);
    let iq = i / 4u;
    let ie = i % 4u;

    for (var t = first; t < first + count; t++) {
        let at = t * p.c + c;
        let r = proj[at];
#ifdef FUSED_LORA
        // Stage this token's hidden values: block m at lora_k[0] + ... + lora_k[m - 1].
        var sh0 = vec4<u32>(0u, p.lora_k.x, p.lora_k.x + p.lora_k.y, p.lora_k.x + p.lora_k.y + p.lora_k.z);
        for (var m = 0u; m < 4u; m++) {
            let src = p.mid_off + p.lora_mid[m] + t * p.lora_k[m];
            for (var e = i; e < p.lora_k[m]; e += N) {
                sh_mid[(sh0[m] + e) / 4u][(sh0[m] + e) % 4u] = proj[src + e];
            }
        }
        workgroupBarrier();
        let lora_w = lora_row(0u, c, sh0.x);
        let lora_a = lora_row(1u, c, sh0.y);
        let lora_v = lora_row(2u, c, sh0.z);
        let g = lora_row(3u, c, sh0.w);
#else
        let lora_w = lora[at];
        let lora_a = lora[tc + at];
        let lora_v = lora[2u * tc + at];
        let g = lora[3u * tc + at];
#endif
        let x = prepare(i, c, at, proj[tc + at], proj[2u * tc + at], lora_w, lora_a, lora_v);

        sh_r[iq][ie] = r;
        sh_w[iq][ie] = x.w;
        sh_k[iq][ie] = x.k;
        sh_kk[iq][ie] = x.kk;
        sh_kka[iq][ie] = x.kk * x.a;
        workgroupBarrier();

        var sa = 0.0;
        for (var q = 0u; q < Q; q++) {
            sa -= dot(S[q], sh_kk[q]);
        }
        var y = 0.0;
        for (var q = 0u; q < Q; q++) {
            S[q] = S[q] * sh_w[q] + sa * sh_kka[q] + x.v * sh_k[q];
            y += dot(S[q], sh_r[q]);
        }
        // finish's first reduction also orders this token's shared reads before the
        // next token's writes.
        out[at] = finish(i, c, y, r * x.k * consts[p.r_k + c], x.v, g);
    }

    store_state(row, S);
}
#endif

#ifdef STAGE_PREPARE
@compute @workgroup_size(HEAD_SIZE)
fn wkv7_prepare(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) i: u32) {
    let c = wid.x * N + i;
    let tc = p.t_total * p.c;
    let at = wid.y * p.c + c;
    let x = prepare(i, c, at, proj[tc + at], proj[2u * tc + at], lora[at], lora[tc + at], lora[2u * tc + at]);
    proj[tc + at] = x.k;
    proj[2u * tc + at] = x.v;
    lora[at] = x.w;
    lora[tc + at] = x.kk;
    lora[2u * tc + at] = x.kk * x.a;
}
#endif

#ifdef STAGE_RECURRENCE
// TOKEN_BLOCK (preprocessor constant) tokens' vectors staged at once: 6 * TOKEN_BLOCK * N
// floats of workgroup memory (12 KiB at N = 64, TOKEN_BLOCK = 8), as vec4s so that each
// read serves four keys.
const TB: u32 = TOKEN_BLOCK;
var<workgroup> blk_r: array<array<vec4<f32>, Q>, TB>;
var<workgroup> blk_w: array<array<vec4<f32>, Q>, TB>;
var<workgroup> blk_k: array<array<vec4<f32>, Q>, TB>;
var<workgroup> blk_kk: array<array<vec4<f32>, Q>, TB>;
var<workgroup> blk_kka: array<array<vec4<f32>, Q>, TB>;
var<workgroup> blk_v: array<array<f32, N>, TB>;
var<workgroup> seq_first: u32;
var<workgroup> seq_len: u32;

@compute @workgroup_size(HEAD_SIZE)
fn wkv7_recurrence(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) i: u32) {
    let h = wid.x;
    let seq = seqs[wid.y];
    if (i == 0u) {
        seq_first = seq.x;
        seq_len = seq.y;
    }
    let first = workgroupUniformLoad(&seq_first);
    let end = first + workgroupUniformLoad(&seq_len);

    let tc = p.t_total * p.c;
    let c = h * N + i;
    let row = seq.z * p.slot_stride + p.wkv_off + c * N;
    var S = load_state(row);

    let iq = i / 4u;
    let ie = i % 4u;
    for (var t0 = first; t0 < end; t0 += TB) {
        let n = min(TB, end - t0);
        // Every thread is done with the previous block before it is overwritten.
        workgroupBarrier();
        for (var u = 0u; u < n; u++) {
            let at = (t0 + u) * p.c + c;
            blk_r[u][iq][ie] = proj[at];
            blk_k[u][iq][ie] = proj[tc + at];
            blk_v[u][i] = proj[2u * tc + at];
            blk_w[u][iq][ie] = lora[at];
            blk_kk[u][iq][ie] = lora[tc + at];
            blk_kka[u][iq][ie] = lora[2u * tc + at];
        }
        workgroupBarrier();
        for (var u = 0u; u < n; u++) {
            var sa = 0.0;
            for (var q = 0u; q < Q; q++) {
                sa -= dot(S[q], blk_kk[u][q]);
            }
            let v = blk_v[u][i];
            var y = 0.0;
            for (var q = 0u; q < Q; q++) {
                S[q] = S[q] * blk_w[u][q] + sa * blk_kka[u][q] + v * blk_k[u][q];
                y += dot(S[q], blk_r[u][q]);
            }
            out[(t0 + u) * p.c + c] = y;
        }
    }

    store_state(row, S);
}
#endif

#ifdef STAGE_FINISH
@compute @workgroup_size(HEAD_SIZE)
fn wkv7_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) i: u32) {
    let c = wid.x * N + i;
    let tc = p.t_total * p.c;
    let at = wid.y * p.c + c;
    let r = proj[at];
    let k = proj[tc + at];
    out[at] = finish(i, c, out[at], r * k * consts[p.r_k + c], proj[2u * tc + at], lora[3u * tc + at]);
}
#endif
