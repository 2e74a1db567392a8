// The RWKV-7 time-mix core for one head of one sequence per workgroup: prepares the
// decay, in-context learning rate, key and value of each token, runs the WKV recurrence
// in token order with the head's 64x64 state held in registers across the whole chunk
// (thread i owns row i = value index), then applies the head's GroupNorm, the r*k*r_k
// bonus and the output gate. The state is read once and written once per chunk.
//
// Per token, with vectors over this head's channels (j = key index):
//   w  = exp(-exp(-0.5) * sigmoid(w0 + w_lora))       a = sigmoid(a0 + a_lora)
//   kk = normalise(k * k_k)                           k = k * (1 + (a - 1) * k_a)
//   v  = layer 0 ? v (and v_first = v) : v + (v_first - v) * sigmoid(v0 + v_lora)
//   S[i, j] = S[i, j] * w[j] - (S[i, :] . kk) * kk[j] * a[j] + v[i] * k[j]
//   y[i] = S[i, :] . r
//   out = (GroupNorm(y) + (r . (k * r_k)) * v) * g
// HEAD_SIZE (preprocessor constant) is N, the workgroup size.
//
// The low-rank second stages (w, a, v, g from the hidden values of the first stages)
// come either from a matrix product before this kernel (`lora`, for prefill chunks and
// big batches, where a GEMM reads each weight once for many tokens), or, with
// FUSED_LORA (decode), are computed here: thread i takes the dot products of row i of
// each second-stage matrix with the token's hidden values, staged in workgroup memory.
// That saves a dispatch per layer where the dispatches' fixed cost dominates.

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

const N: u32 = HEAD_SIZE;
const DECAY_SCALE: f32 = -0.6065306597126334;  // -exp(-0.5)

var<workgroup> sh_r: array<f32, N>;
var<workgroup> sh_w: array<f32, N>;
var<workgroup> sh_k: array<f32, N>;
var<workgroup> sh_kk: array<f32, N>;
var<workgroup> sh_kka: array<f32, N>;
var<workgroup> red: array<f32, N>;
#ifdef FUSED_LORA
var<workgroup> sh_mid: array<vec4<f32>, 512>;  // one token's hidden values: w, a, v, g back to back
#endif
var<workgroup> seq_first: u32;
var<workgroup> seq_len: u32;

fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

fn head_sum(i: u32, v: f32) -> f32 {
    red[i] = v;
    workgroupBarrier();
    for (var s = N / 2u; s > 0u; s = s >> 1u) {
        if (i < s) {
            red[i] = red[i] + red[i + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

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
    let row = seq.z * p.slot_stride + p.wkv_off + (h * N + i) * N;
    var S: array<f32, N>;
    for (var j = 0u; j < N; j++) {
        S[j] = state[row + j];
    }

    for (var t = first; t < first + count; t++) {
        let at = t * p.c + c;
        let r = proj[at];
        var k = proj[tc + at];
        var v = proj[2u * tc + at];
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
        let w = exp(DECAY_SCALE * sigmoid(consts[p.w0 + c] + lora_w));
        let a = sigmoid(consts[p.a0 + c] + lora_a);

        let kk_raw = k * consts[p.k_k + c];
        let kk = kk_raw / max(sqrt(head_sum(i, kk_raw * kk_raw)), 1e-12);
        k = k * (1.0 + (a - 1.0) * consts[p.k_a + c]);
        if (p.first_layer == 1u) {
            v_first[at] = v;
        } else {
            v = v + (v_first[at] - v) * sigmoid(consts[p.v0 + c] + lora_v);
        }

        sh_r[i] = r;
        sh_w[i] = w;
        sh_k[i] = k;
        sh_kk[i] = kk;
        sh_kka[i] = kk * a;
        workgroupBarrier();

        var sa = 0.0;
        for (var j = 0u; j < N; j++) {
            sa -= S[j] * sh_kk[j];
        }
        var y = 0.0;
        var bonus = 0.0;
        for (var j = 0u; j < N; j++) {
            S[j] = S[j] * sh_w[j] + sa * sh_kka[j] + v * sh_k[j];
            y += S[j] * sh_r[j];
            bonus += sh_r[j] * sh_k[j] * consts[p.r_k + h * N + j];
        }

        let mean = head_sum(i, y) / f32(N);
        let d = y - mean;
        let variance = head_sum(i, d * d) / f32(N);
        let yn = d * inverseSqrt(variance + p.eps) * consts[p.lnx_w + c] + consts[p.lnx_b + c];
        out[at] = (yn + bonus * v) * g;
    }

    for (var j = 0u; j < N; j++) {
        state[row + j] = S[j];
    }
}
