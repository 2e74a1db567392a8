// Draws each wanted row's next token on the device, the way src/sampler.rs does on the
// host (the official sampler of rwkv7.md: penalties, softmax, top-p, top-k, temperature,
// an inverse-CDF draw walking the token ids in order), so that a decode step reads back
// one token per sequence instead of its whole vocabulary of logits.
//
// The host sums in f64 and this kernel in f32, so a draw can differ from the host's only
// where u falls within rounding of a boundary between two tokens' intervals, or where a
// token's probability is within rounding of the top-p cutoff (tests/test_kernels.py
// bounds both).
//
// One workgroup of WG threads per row (workgroup_id.y), in passes over the row:
//   1. the penalty entries written into the row (one entry per token, merged on the host)
//   2. the largest logit, then the softmax: probabilities written back in place
//   3. top-p: the largest v with mass {p >= v} >= top_p, found digit by digit over the
//      probabilities' bits (non-negative f32s order like their bits), 4 bits a pass
//   4. top-k: the k-th largest kept probability, the same way over counts; among equal
//      ones at the k-th place the lower ids are kept (as the host's sort)
//   5. the draw: each thread a contiguous range of ids, prefix sums over the threads, and
//      the thread whose range holds u * total walks it.
// A pass's per-thread partial sums go to the thread's own column of `hist` (no atomics).

struct Params {
    vocab: u32,
    row0: u32,    // `draws` and `best` row of this dispatch's first logits row
    _pad0: u32,
    _pad1: u32,
}

struct Draw {
    u: f32,            // uniform in [0, 1): this draw's random number
    temperature: f32,  // 0: greedy (tied maxima share)
    top_p: f32,        // >= 1: off
    top_k: u32,        // 0: off
    fallback: u32,     // the token when nothing can be drawn (every logit -inf or NaN)
    first_entry: u32,  // the row's penalty entries: entries[first_entry .. first_entry + entries]
    entries: u32,
    skip: u32,         // 1: this row draws nothing (its sequence is still reading its prompt)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;  // (rows, vocab); probabilities after pass 2
@group(0) @binding(2) var<storage, read> draws: array<Draw>;       // (row0 + rows)
@group(0) @binding(3) var<storage, read> entries: array<vec4<u32>>; // token, bias bits, penalty bits, banned (bias bits: -inf)
@group(0) @binding(4) var<storage, read_write> best: array<u32>;    // (row0 + rows, 2): token (skipped: NONE), 0

const WG: u32 = 128u;
const DIGITS: u32 = 16u;        // 4 bits per radix pass
const LEVELS: u32 = 8u;         // 32 bits
const NONE: u32 = 0xffffffffu;
const FLT_MAX: f32 = 3.40282347e38;
const POS_INF: u32 = 0x7f800000u;  // bits of +inf
const NEG_INF: u32 = 0xff800000u;  // bits of -inf

var<workgroup> red_f: array<f32, WG>;
var<workgroup> red_u: array<u32, WG>;
var<workgroup> hist: array<u32, 2048>;  // (DIGITS, WG): f32 bits or counts
var<workgroup> found: vec4<u32>;        // a radix descent's state: prefix, above (f32 bits or count), -, -

// Neither NaN nor -inf (+inf is live).
fn is_live(x: f32) -> bool {
    let bits = bitcast<u32>(x);
    return (bits & 0x7fffffffu) <= POS_INF && bits != NEG_INF;
}

fn sum_f(lid: u32, v: f32) -> f32 {
    workgroupBarrier();  // earlier readers of red_f are done
    red_f[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if (lid < s) {
            red_f[lid] += red_f[lid + s];
        }
    }
    return workgroupUniformLoad(&red_f[0]);
}

fn max_f(lid: u32, v: f32) -> f32 {
    workgroupBarrier();
    red_f[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if (lid < s) {
            red_f[lid] = max(red_f[lid], red_f[lid + s]);
        }
    }
    return workgroupUniformLoad(&red_f[0]);
}

// The sum (op 0), the minimum (op 1) or the maximum (op 2) over the threads.
fn reduce_u(lid: u32, v: u32, op: u32) -> u32 {
    workgroupBarrier();
    red_u[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if (lid < s) {
            let a = red_u[lid];
            let b = red_u[lid + s];
            red_u[lid] = select(select(max(a, b), min(a, b), op == 1u), a + b, op == 0u);
        }
    }
    return workgroupUniformLoad(&red_u[0]);
}

// Inclusive prefix sums over the threads, left in red_f (red_u): thread t's range of a
// draw is [red[t - 1], red[t]), so neighbouring ranges meet exactly.
fn scan_f(lid: u32, v: f32) {
    workgroupBarrier();
    red_f[lid] = v;
    for (var s = 1u; s < WG; s = s << 1u) {
        workgroupBarrier();
        let add = select(0.0, red_f[max(lid, s) - s], lid >= s);
        workgroupBarrier();
        red_f[lid] += add;
    }
    workgroupBarrier();
}

// Each thread's exclusive prefix of `v` over the threads before it.
fn exclusive_u(lid: u32, v: u32) -> u32 {
    workgroupBarrier();
    red_u[lid] = v;
    for (var s = 1u; s < WG; s = s << 1u) {
        workgroupBarrier();
        let add = select(0u, red_u[max(lid, s) - s], lid >= s);
        workgroupBarrier();
        red_u[lid] += add;
    }
    workgroupBarrier();
    return red_u[lid] - v;
}

// Sums each digit's column of `hist` into hist[d * WG] (as f32 bits when `floats`).
fn reduce_hist(lid: u32, floats: bool) {
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        for (var i = lid; i < DIGITS * s; i += WG) {
            let at = (i / s) * WG + i % s;
            if (floats) {
                hist[at] = bitcast<u32>(bitcast<f32>(hist[at]) + bitcast<f32>(hist[at + s]));
            } else {
                hist[at] += hist[at + s];
            }
        }
    }
    workgroupBarrier();
}

// The bits above digit `level` (those already chosen).
fn high_mask(level: u32) -> u32 {
    return ~(0xffffffffu >> (4u * level));
}

// The largest probability v >= floor with (mass or count) {p >= v, p >= floor} >= goal:
// a radix descent from the top digit. Returns (v bits, mass or count above v as bits,
// whether the goal was reached at all).
fn descend(lid: u32, base: u32, floor: f32, goal: f32, floats: bool) -> vec3<u32> {
    workgroupBarrier();  // every thread has read the previous descent's result
    if (lid == 0u) {
        found = vec4<u32>(0u, 0u, 1u, 0u);
    }
    for (var level = 0u; level < LEVELS; level++) {
        let chosen = workgroupUniformLoad(&found);
        let shift = 28u - 4u * level;
        for (var d = 0u; d < DIGITS; d++) {
            hist[d * WG + lid] = 0u;
        }
        for (var i = lid; i < p.vocab; i += WG) {
            let q = logits[base + i];
            let bits = bitcast<u32>(q);
            if (q > 0.0 && q >= floor && (bits & high_mask(level)) == chosen.x) {
                let at = ((bits >> shift) & 15u) * WG + lid;
                if (floats) {
                    hist[at] = bitcast<u32>(bitcast<f32>(hist[at]) + q);
                } else {
                    hist[at] += 1u;
                }
            }
        }
        reduce_hist(lid, floats);
        if (lid == 0u) {
            // From the top digit down: the first whose mass, with all above it, reaches
            // the goal. None at the top level: the goal is never reached. None deeper
            // (the digits summed in another order fell short by a rounding): the lowest
            // non-empty digit, so that the whole bucket stays.
            var above = select(f32(chosen.y), bitcast<f32>(chosen.y), floats);
            var digit = NONE;
            var lowest = NONE;
            for (var k = 0u; k < DIGITS; k++) {
                let d = DIGITS - 1u - k;
                let h = select(f32(hist[d * WG]), bitcast<f32>(hist[d * WG]), floats);
                if (digit == NONE && h > 0.0) {
                    lowest = d;
                    if (above + h >= goal) {
                        digit = d;
                    } else {
                        above += h;
                    }
                }
            }
            var reached = chosen.z;
            if (digit == NONE) {
                if (level == 0u) {
                    reached = 0u;
                }
                digit = select(0u, lowest, lowest != NONE);
                if (lowest != NONE) {
                    // Not counted above: the bucket is the one kept.
                    above -= select(f32(hist[lowest * WG]), bitcast<f32>(hist[lowest * WG]), floats);
                }
            }
            let above_bits = select(u32(above), bitcast<u32>(above), floats);
            found = vec4<u32>(chosen.x | (digit << shift), above_bits, reached, 0u);
        }
    }
    let last = workgroupUniformLoad(&found);
    return last.xyz;
}

@compute @workgroup_size(128)
fn sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = p.row0 + wid.y;
    let d = draws[row];
    if (d.skip != 0u) {
        if (lid == 0u) {
            best[2u * row] = NONE;
            best[2u * row + 1u] = 0u;
        }
        return;
    }
    let vocab = p.vocab;
    let base = wid.y * vocab;

    // 1. Penalties. The host merged each token's bias, ban and penalty into one entry, so
    // no two threads write one logit; the order of the host's arithmetic is kept.
    for (var e = lid; e < d.entries; e += WG) {
        let entry = entries[d.first_entry + e];
        if (entry.x < vocab) {
            let at = base + entry.x;
            if (entry.w != 0u) {
                logits[at] = bitcast<f32>(entry.y);
            } else {
                logits[at] = (logits[at] + bitcast<f32>(entry.y)) - bitcast<f32>(entry.z);
            }
        }
    }
    storageBarrier();

    // 2. Softmax. NaN counts as -inf; +inf logits share all the mass; all -inf (or NaN):
    // nothing can be drawn. NaN and the infinities are told by their bits: WGSL lets a
    // compiler assume that float compares never meet them.
    var m = -FLT_MAX;
    var live = 0u;
    for (var i = lid; i < vocab; i += WG) {
        let x = logits[base + i];
        if (is_live(x)) {
            m = max(m, x);
            live = 1u;
        }
    }
    m = max_f(lid, m);
    if (reduce_u(lid, live, 2u) == 0u) {
        if (lid == 0u) {
            best[2u * row] = d.fallback;
            best[2u * row + 1u] = 0u;
        }
        return;
    }
    let infinite = bitcast<u32>(m) == POS_INF;
    var total = 0.0;
    for (var i = lid; i < vocab; i += WG) {
        let x = logits[base + i];
        // The maximum's e is exactly 1 (exp is only within a few ULP): greedy keeps it.
        var e = select(exp(x - m), 1.0, x == m);
        e = select(e, select(0.0, 1.0, bitcast<u32>(x) == POS_INF), infinite);
        e = select(0.0, e, is_live(x));
        logits[base + i] = e;
        total += e;
    }
    let inv_sum = 1.0 / sum_f(lid, total);
    for (var i = lid; i < vocab; i += WG) {
        logits[base + i] = logits[base + i] * inv_sum;
    }
    storageBarrier();
    // The largest probability: the maximum's e is exactly 1.
    let top = inv_sum;

    // 3. Top-p (greedy: top_p 0, temperature 1). Kept: p >= floor.
    let greedy = d.temperature == 0.0;
    let top_p = select(d.top_p, 0.0, greedy);
    let temperature = select(d.temperature, 1.0, greedy);
    var floor = bitcast<f32>(1u);  // the least positive f32: every p > 0
    if (top_p <= 0.0) {
        floor = top;  // the descent would find the largest probability
    } else if (top_p < 1.0) {
        let cut = descend(lid, base, floor, top_p, true);
        if (cut.z != 0u) {
            floor = bitcast<f32>(cut.x);
        }
    }

    // 4. Top-k over the kept: the k-th largest kept value kth; all above it are kept, and
    // of those equal to it the first `ties` by id.
    var kth = 0.0;
    var ties = NONE;
    let top_k = d.top_k;
    var kept = 0u;
    if (top_k > 0u) {
        var mine = 0u;
        for (var i = lid; i < vocab; i += WG) {
            let q = logits[base + i];
            mine += u32(q > 0.0 && q >= floor);
        }
        kept = reduce_u(lid, mine, 0u);
    }
    if (top_k > 0u && top_k < kept) {
        let kv = descend(lid, base, floor, f32(top_k), false);
        kth = bitcast<f32>(kv.x);
        ties = top_k - kv.y;
    }

    storageBarrier();  // every pass above has read the row: step 5 rewrites it

    // 5. The draw, in id order: thread lid walks ids [first, end).
    let span = (vocab + WG - 1u) / WG;
    let first = min(lid * span, vocab);
    let end = min(first + span, vocab);
    var tie_rank = 0u;  // equal-to-kth values before this thread's range
    if (ties != NONE) {
        var mine = 0u;
        for (var i = first; i < end; i++) {
            mine += u32(logits[base + i] == kth);
        }
        tie_rank = exclusive_u(lid, mine);
    }
    let inv_t = 1.0 / temperature;
    var sum = 0.0;
    var last = NONE;
    var rank = tie_rank;
    for (var i = first; i < end; i++) {
        let q = logits[base + i];
        var keep = q > 0.0 && q >= floor;
        if (ties != NONE) {
            keep = keep && (q > kth || (q == kth && rank < ties));
            rank += u32(q == kth);
        }
        var w = select(0.0, q, keep);
        if (keep && temperature != 1.0) {
            // The top weighs 1 whatever inv_t (pow(1, inf) would be NaN).
            w = select(pow(q / top, inv_t), 1.0, q == top);
        }
        // A weight written back for the walk below (0: not drawable).
        logits[base + i] = w;
        if (w > 0.0) {
            sum += w;
            last = i;
        }
    }
    scan_f(lid, sum);
    let before = select(0.0, red_f[max(lid, 1u) - 1u], lid > 0u);
    let after = red_f[lid];
    let all = workgroupUniformLoad(&red_f[WG - 1u]);
    let goal = d.u * all;
    var token = NONE;
    if (after > before && goal >= before && goal < after) {
        var acc = before;
        for (var i = first; i < end; i++) {
            let w = logits[base + i];
            acc += w;
            if (w > 0.0 && goal < acc) {
                token = i;
                break;
            }
        }
        if (token == NONE) {
            token = last;  // the walk's sum rounded below the scan's: the range's last
        }
    }
    token = reduce_u(lid, token, 1u);
    // u * total rounded up past every range: the last drawable token.
    let last_all = reduce_u(lid, select(last, 0u, last == NONE), 2u);
    if (lid == 0u) {
        var chosen = token;
        if (chosen == NONE) {
            chosen = select(d.fallback, last_all, all > 0.0);
        }
        best[2u * row] = chosen;
        best[2u * row + 1u] = 0u;
    }
}
