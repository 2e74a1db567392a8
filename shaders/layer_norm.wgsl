// LayerNorm over channels: y[out_row0 + r] = (x[in_row0 + r] - mean) / sqrt(var + eps) * weight + bias.
// One workgroup per row; two passes (mean, then centred variance) for accuracy, reduced
// as a fixed tree in workgroup memory so results are bit-identical run to run.

struct Params {
    c: u32,        // channels per row
    rows: u32,     // rows to normalise
    in_row0: u32,  // first input row (lets the head normalise only the rows it needs)
    w_off: u32,    // offset of the weight vector in `consts` (bias follows at b_off)
    b_off: u32,
    eps: f32,
    out_row0: u32, // first output row (lets the head gather rows of several sequences)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (in_rows, C)
@group(0) @binding(2) var<storage, read> consts: array<f32>;   // packed f32 vectors
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // (out_row0 + rows, C)

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

fn workgroup_sum(lid: u32, v: f32) -> f32 {
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

@compute @workgroup_size(256)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) {
        return;
    }
    let src = (p.in_row0 + row) * p.c;
    let dst = (p.out_row0 + row) * p.c;
    let inv_c = 1.0 / f32(p.c);

    var s = 0.0;
    for (var i = lid; i < p.c; i += WG) {
        s += x[src + i];
    }
    let mean = workgroup_sum(lid, s) * inv_c;

    var q = 0.0;
    for (var i = lid; i < p.c; i += WG) {
        let d = x[src + i] - mean;
        q += d * d;
    }
    let rstd = inverseSqrt(workgroup_sum(lid, q) * inv_c + p.eps);

    for (var i = lid; i < p.c; i += WG) {
        y[dst + i] = (x[src + i] - mean) * rstd * consts[p.w_off + i] + consts[p.b_off + i];
    }
}
