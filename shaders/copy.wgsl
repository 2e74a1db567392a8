// Copies `n` 16-byte words from `src` to `dst`: the memory bandwidth probe that the bench
// compares decode speed against (a decode step streams every weight once, so bytes
// moved per second by a plain copy bound its tokens per second). One word per thread;
// the grid is folded into two dimensions for large buffers.

struct Params {
    n: u32,       // 16-byte words to copy
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i < p.n) {
        dst[i] = src[i];
    }
}
