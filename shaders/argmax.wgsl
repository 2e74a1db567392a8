// The index of the largest logit, for choosing the next token on the device (greedy
// decoding reads back 8 bytes instead of the whole vocabulary). The head's logits come
// in row chunks, one buffer each: one dispatch per chunk folds that chunk's best into
// the running result in `best` (the first chunk starts it). Among equal values the lowest
// index wins, as numpy.argmax; -inf is never chosen over a finite value.
// One workgroup of 256 threads per token (workgroup_id.y: tokens of several sequences
// at once): each thread scans a strided share of the rows, then a tree reduction in
// workgroup memory.

struct Params {
    rows: u32,    // logits in this chunk
    row0: u32,    // vocabulary index of its first row
    first: u32,   // 1 for the first chunk: ignore what `best` held
    out0: u32,    // `best` row of this dispatch's first token
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;      // (tokens, rows)
@group(0) @binding(2) var<storage, read_write> best: array<u32>;  // (out0 + tokens, 2): index, value bits

const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;
var<workgroup> values: array<f32, WG>;
var<workgroup> indices: array<u32, WG>;

// Whether (v, i) beats (bv, bi).
fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return i != NONE && (bi == NONE || v > bv || (v == bv && i < bi));
}

@compute @workgroup_size(256)
fn argmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.y * p.rows;
    let out = 2u * (p.out0 + wid.y);
    var bv = 0.0;
    var bi = NONE;
    for (var r = lid; r < p.rows; r += WG) {
        let v = logits[base + r];
        if (better(v, p.row0 + r, bv, bi)) {
            bv = v;
            bi = p.row0 + r;
        }
    }
    values[lid] = bv;
    indices[lid] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s && better(values[lid + s], indices[lid + s], values[lid], indices[lid])) {
            values[lid] = values[lid + s];
            indices[lid] = indices[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        var v = values[0];
        var i = indices[0];
        if (p.first == 0u && better(bitcast<f32>(best[out + 1u]), best[out], v, i)) {
            i = best[out];
            v = bitcast<f32>(best[out + 1u]);
        }
        best[out] = i;
        best[out + 1u] = bitcast<u32>(v);
    }
}
