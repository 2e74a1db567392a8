// Quantizes a weight matrix [M, K] of f16 pairs (packed two per u32 along K) into the
// formats matmul.wgsl reads, in blocks of 64 along K; one invocation per row and pair of
// blocks (the two blocks share a u32 of f16 scales). K is a multiple of 64.
//
// Variants: INT8 (symmetric: s = f16(absmax / 127), q = clamp(round(w / s), -127, 127),
// 4 codes per u32, byte k % 4 of word k / 4) or NF4 (s = f16(absmax), q = the nearest
// NormalFloat value to w / s, ties to the lower one, 8 codes per u32, low nibble first).
// Scales are rounded to f16 before the codes are chosen, so codes fit the stored scale.
// round() is round-half-to-even, as NumPy's rint in tests/support/quant_reference.py.

struct Params {
    m: u32,
    k: u32,
    s_off: u32,   // first word of the scales in dst
    dst_off: u32, // first word of the codes in dst (matrices may share a buffer)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;        // (M, K/2) f16 pairs
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;  // codes, then scales

#ifdef NF4
// Decision thresholds: midpoints between consecutive NormalFloat values.
// (f32 values of (NF4[i] + NF4[i + 1]) / 2, as tests/support/quant_reference.py computes them.)
var<private> NF4_MID: array<f32, 15> = array<f32, 15>(
    -0.8480963706970215, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
    -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767,
    0.120255246758461, 0.2035212516784668, 0.2920137643814087, 0.3893125355243683,
    0.5016634464263916, 0.6427869200706482, 0.8614784479141235);

fn nf4_code(x: f32) -> u32 {
    var code = 0u;
    for (var i = 0u; i < 15u; i++) {
        code += select(0u, 1u, x > NF4_MID[i]);
    }
    return code;
}
#endif

fn to_f16(v: f32) -> f32 {
    return unpack2x16float(pack2x16float(vec2<f32>(v, 0.0))).x;
}

fn value(row: u32, k: u32) -> f32 {
    let pair = unpack2x16float(src[row * (p.k / 2u) + k / 2u]);
    return select(pair.x, pair.y, (k & 1u) == 1u);
}

@compute @workgroup_size(64)
fn quantize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pairs_per_row = (p.k + 127u) / 128u;
    let index = gid.y * nwg.x * 64u + gid.x;
    let row = index / pairs_per_row;
    if (row >= p.m) {
        return;
    }
    let pair = index % pairs_per_row;
    var scales = vec2<f32>(0.0);
    for (var half = 0u; half < 2u; half++) {
        let block = 2u * pair + half;
        let k0 = block * 64u;
        if (k0 >= p.k) {
            break;
        }
        var absmax = 0.0;
        for (var k = k0; k < k0 + 64u; k++) {
            absmax = max(absmax, abs(value(row, k)));
        }
#ifdef INT8
        let scale = to_f16(absmax / 127.0);
        for (var g = 0u; g < 16u; g++) {
            var word = 0u;
            for (var e = 0u; e < 4u; e++) {
                var q = 0;
                if (scale > 0.0) {
                    q = i32(clamp(round(value(row, k0 + 4u * g + e) / scale), -127.0, 127.0));
                }
                word |= (bitcast<u32>(q) & 0xffu) << (8u * e);
            }
            dst[p.dst_off + row * (p.k / 4u) + block * 16u + g] = word;
        }
#else
        let scale = to_f16(absmax);
        for (var g = 0u; g < 8u; g++) {
            var word = 0u;
            for (var e = 0u; e < 8u; e++) {
                var code = 7u; // exactly 0
                if (scale > 0.0) {
                    code = nf4_code(value(row, k0 + 8u * g + e) / scale);
                }
                word |= code << (4u * e);
            }
            dst[p.dst_off + row * (p.k / 8u) + block * 8u + g] = word;
        }
#endif
        scales[half] = scale;
    }
    dst[p.s_off + row * pairs_per_row + pair] = pack2x16float(scales);
}
