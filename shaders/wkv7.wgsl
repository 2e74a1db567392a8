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
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> rkv: array<f32>;          // (3, T, C): r, k, v
@group(0) @binding(2) var<storage, read> lora: array<f32>;         // (4, T, C): w, a, v, g low-rank outputs
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
        let r = rkv[at];
        var k = rkv[tc + at];
        var v = rkv[2u * tc + at];
        let w = exp(DECAY_SCALE * sigmoid(consts[p.w0 + c] + lora[at]));
        let a = sigmoid(consts[p.a0 + c] + lora[tc + at]);
        let g = lora[3u * tc + at];

        let kk_raw = k * consts[p.k_k + c];
        let kk = kk_raw / max(sqrt(head_sum(i, kk_raw * kk_raw)), 1e-12);
        k = k * (1.0 + (a - 1.0) * consts[p.k_a + c]);
        if (p.first_layer == 1u) {
            v_first[at] = v;
        } else {
            v = v + (v_first[at] - v) * sigmoid(consts[p.v0 + c] + lora[2u * tc + at]);
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
