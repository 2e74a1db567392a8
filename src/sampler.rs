//! Token sampling as the official `rwkv` pip package (0.8.32) does it: the penalties of
//! `PIPELINE.generate` and the draw of `PIPELINE.sample_logits` (docs/rwkv7.md,
//! "Sampling as the official package does it").
//!
//! Precision: probabilities are f32, as in the official (torch/numpy float32), but every
//! reduction (softmax denominator, top-p running sum, renormalisation) and the temperature
//! power run in f64. Bit parity is out of reach anyway (the official's own CPU and CUDA
//! paths round differently); f64 keeps each decision at least as close to exact arithmetic.
//! (At top_p 0.85-0.99 on flat 65536-token distributions the official's f32 running sum
//! drifts by ~1e-5, moving its cutoff by a few tail tokens, ~2e-5 of mass, from ours.)
//! Penalty counts are f64, like the Python floats they mirror.
//!
//! Deliberate differences, each where the official's result is an accident of rounding:
//! - if the running sum never reaches top_p (only by rounding, top_p near 1) nothing is cut,
//!   so top_p = 1 means "off"; numpy's `argmax` of an all-false mask would pick index 0 and
//!   silently turn the draw greedy.
//! - top-k ties at the k-th place keep the lowest token ids (numpy's argsort order is not
//!   specified).
//! - the temperature power is taken relative to the largest kept probability, so that a
//!   small temperature cannot underflow every weight to 0 (the official then divides 0 by 0).
//! - NaN logits count as -inf; when nothing at all is drawable, the first token that is
//!   neither banned nor biased to -inf is returned.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};

/// A token whose bytes are a substring of this counts 0 (it still pays the presence penalty).
const FREE_TEXT: &[u8] = b" \t0123456789";

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    /// 0 = greedy (the official way: top_p 0 at temperature 1, so tied maxima share the draw).
    pub temperature: f32,
    /// Nucleus mass in [0, 1], decided at temperature 1; 1 = off.
    pub top_p: f32,
    /// 0 (or >= vocab) = off.
    pub top_k: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Every count is multiplied by this after each draw.
    pub penalty_decay: f32,
    pub banned: Vec<u32>,
    /// Added to the logit before bans and penalties (not in the official; -inf bans).
    pub logit_bias: Vec<(u32, f32)>,
    /// Same seed, same draws; None = seeded from OS entropy and the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingOptions {
    /// The official RWKV-7 chat demo's settings.
    fn default() -> Self {
        SamplingOptions {
            temperature: 1.0,
            top_p: 0.3,
            top_k: 0,
            presence_penalty: 0.5,
            frequency_penalty: 0.5,
            penalty_decay: 0.996,
            banned: vec![0],
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

fn invalid<T>(message: String) -> Result<T> {
    Err(Error::Invalid(message))
}

impl SamplingOptions {
    pub fn validate(&self, vocab: usize) -> Result<()> {
        if vocab == 0 || vocab > u32::MAX as usize {
            return invalid(format!("vocabulary size {vocab} must be in 1..=4294967295"));
        }
        let unit = |v: f32| (0.0..=1.0).contains(&v); // false for NaN
        for (name, v, ok, rule) in [
            (
                "temperature",
                self.temperature,
                self.temperature.is_finite() && self.temperature >= 0.0,
                "finite and >= 0",
            ),
            ("top_p", self.top_p, unit(self.top_p), "in [0, 1]"),
            ("presence_penalty", self.presence_penalty, self.presence_penalty.is_finite(), "finite"),
            ("frequency_penalty", self.frequency_penalty, self.frequency_penalty.is_finite(), "finite"),
            ("penalty_decay", self.penalty_decay, unit(self.penalty_decay), "in [0, 1]"),
        ] {
            if !ok {
                return invalid(format!("{name} {v} must be {rule}"));
            }
        }
        let mut dead = vec![false; vocab];
        for &t in &self.banned {
            if t as usize >= vocab {
                return invalid(format!("banned token {t} is outside the vocabulary of {vocab}"));
            }
            dead[t as usize] = true;
        }
        let mut seen = HashSet::new();
        for &(t, bias) in &self.logit_bias {
            if t as usize >= vocab {
                return invalid(format!("logit_bias token {t} is outside the vocabulary of {vocab}"));
            }
            if !seen.insert(t) {
                return invalid(format!("logit_bias names token {t} twice"));
            }
            if bias.is_nan() || bias == f32::INFINITY {
                return invalid(format!("logit_bias {bias} for token {t} must be finite or -inf"));
            }
            dead[t as usize] |= bias == f32::NEG_INFINITY;
        }
        if dead.iter().all(|&d| d) {
            return invalid(format!("all {vocab} tokens are banned"));
        }
        Ok(())
    }
}

/// One token's penalties as the device applies them: `(logit + bias) - penalty`, or -inf
/// when banned (`Sampler::apply_penalties`' order of arithmetic).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PenaltyEntry {
    pub token: u32,
    pub bias: f32,
    pub penalty: f32,
    pub banned: bool,
}

/// One draw for the device's sampler (shaders/sample.wgsl): a sequence's options, its
/// penalty entries (one per token, by id) and its random number in [0, 1).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceDraw {
    pub u: f32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub fallback: u32,
    pub entries: Vec<PenaltyEntry>,
}

/// One generation's sampler: options, penalty counts (generated tokens only) and RNG.
/// Make a new one (or `reset`) per generate call, as the official starts its counts empty.
#[derive(Clone)]
pub struct Sampler {
    options: SamplingOptions,
    vocab: usize,
    counts: HashMap<u32, f64>,
    rng: Rng,
}

impl Sampler {
    pub fn new(options: SamplingOptions, vocab: usize) -> Result<Sampler> {
        options.validate(vocab)?;
        let rng = Rng::new(options.seed.unwrap_or_else(entropy_seed));
        Ok(Sampler { options, vocab, counts: HashMap::new(), rng })
    }

    pub fn options(&self) -> &SamplingOptions {
        &self.options
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Logits from their little-endian f32 bytes, one value per token of the vocabulary.
    pub fn logits_from_le_bytes(&self, raw: &[u8]) -> Result<Vec<f32>> {
        if raw.len() != self.vocab * 4 {
            return Err(Error::Shape(format!(
                "logits hold {} bytes; this sampler needs {} float32 values ({} bytes)",
                raw.len(),
                self.vocab,
                self.vocab * 4
            )));
        }
        Ok(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Forgets the penalty counts (the RNG goes on).
    pub fn reset(&mut self) {
        self.counts.clear();
    }

    /// The penalty counts by token id (for tests and debugging).
    pub fn counts(&self) -> Vec<(u32, f64)> {
        let mut counts: Vec<_> = self.counts.iter().map(|(&t, &c)| (t, c)).collect();
        counts.sort_unstable_by_key(|c| c.0);
        counts
    }

    /// Applies logit bias, bans and the presence/frequency penalties to `logits` in place.
    pub fn apply_penalties(&self, logits: &mut [f32]) {
        let o = &self.options;
        for &(t, bias) in &o.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        for &t in &o.banned {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let (presence, frequency) = (o.presence_penalty as f64, o.frequency_penalty as f64);
        for (&t, &count) in &self.counts {
            if let Some(l) = logits.get_mut(t as usize) {
                // As the official: the penalty is a Python float, subtracted from a float32 logit.
                *l -= (presence + count * frequency) as f32;
            }
        }
    }

    /// Draws a token from logits (already through `apply_penalties`), as the official
    /// `sample_logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        // Exactly one RNG step per call, so a seeded stream does not depend on the options.
        let u = self.rng.next_f64();
        let kept = self.distribution(logits);
        let target = u * mass(&kept, |k| k.1);
        let mut acc = 0.0;
        for &(t, w) in &kept {
            acc += w as f64;
            if target < acc {
                return t;
            }
        }
        // Only if u * total rounded up past the walk's sum: the last drawable token.
        kept.iter().rev().find(|k| k.1 > 0.0).map_or_else(|| self.fallback(), |k| k.0)
    }

    /// What the device needs to draw this sampler's next token (`DeviceDraw`): its options,
    /// the penalties as one entry per token, and the random number `sample` would take
    /// next, so that a seeded run draws the same tokens on either side (up to the rounding
    /// of the device's f32 sums: see shaders/sample.wgsl). The stream moves past that
    /// number only with `drew_on_device`, once the draw is done: a failed step leaves the
    /// sampler as it was.
    pub fn device_draw(&self) -> DeviceDraw {
        let u = self.rng.clone().next_f64();
        let o = &self.options;
        let mut entries: HashMap<u32, PenaltyEntry> = HashMap::new();
        let blank = PenaltyEntry { token: 0, bias: 0.0, penalty: 0.0, banned: false };
        for &(t, bias) in &o.logit_bias {
            entries.insert(t, PenaltyEntry { token: t, bias, ..blank });
        }
        for &t in &o.banned {
            entries.entry(t).or_insert(PenaltyEntry { token: t, ..blank }).banned = true;
        }
        let (presence, frequency) = (o.presence_penalty as f64, o.frequency_penalty as f64);
        for (&t, &count) in &self.counts {
            entries.entry(t).or_insert(PenaltyEntry { token: t, ..blank }).penalty =
                (presence + count * frequency) as f32;
        }
        let mut entries: Vec<PenaltyEntry> = entries.into_values().collect();
        entries.sort_unstable_by_key(|e| e.token);
        DeviceDraw {
            // The largest f32 below 1 at most: u itself is below 1.
            u: (u as f32).min(f32::from_bits(0x3f7f_ffff)),
            temperature: o.temperature,
            top_p: o.top_p,
            top_k: o.top_k.min(self.vocab) as u32,
            fallback: self.fallback(),
            entries,
        }
    }

    /// The device drew with `device_draw`'s number: the stream moves past it.
    pub fn drew_on_device(&mut self) {
        self.rng.next_f64();
    }

    /// After a draw: decays every count, then counts `token` (+0 for whitespace/digit text).
    pub fn record(&mut self, token: u32, token_bytes: &[u8]) -> Result<()> {
        if token as usize >= self.vocab {
            return Err(Error::Shape(format!("token {token} is outside the vocabulary of {}", self.vocab)));
        }
        let decay = self.options.penalty_decay as f64;
        self.counts.values_mut().for_each(|c| *c *= decay);
        let free = token_bytes.is_empty() || FREE_TEXT.windows(token_bytes.len()).any(|w| w == token_bytes);
        *self.counts.entry(token).or_insert(0.0) += if free { 0.0 } else { 1.0 };
        Ok(())
    }

    /// The distribution `sample` draws from, one probability per logit.
    pub fn probabilities(&self, logits: &[f32]) -> Vec<f32> {
        let kept = self.distribution(logits);
        let total = mass(&kept, |k| k.1);
        let mut probs = vec![0.0; logits.len()];
        for (t, w) in kept {
            if let Some(p) = probs.get_mut(t as usize) {
                *p = (w as f64 / total) as f32;
            }
        }
        probs
    }

    /// The tokens that can be drawn, in id order (as numpy's choice walks them), with their
    /// unnormalised weights (the top one is 1 when temperature != 1).
    fn distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let o = &self.options;
        let (temperature, top_p) = if o.temperature == 0.0 { (1.0, 0.0) } else { (o.temperature, o.top_p) };
        let probs = softmax(logits);
        // Ties at the cutoff survive; no cutoff (top_p 1, or never reached) keeps everything.
        let cutoff = if top_p < 1.0 { top_p_cutoff(&probs, top_p as f64) } else { None };
        let floor = cutoff.unwrap_or(f32::from_bits(1)); // the least positive f32
                                                         // Branch-free compaction: on flat distributions each test is a coin flip.
        let (mut kept, mut n) = (vec![(0u32, 0.0f32); probs.len()], 0);
        for (i, &p) in probs.iter().enumerate() {
            kept[n] = (i as u32, p);
            n += (p >= floor) as usize;
        }
        kept.truncate(n);
        // Top-k after top-p: top-p keeps a head of the descending order, so its k largest
        // are the intersection the official computes.
        if o.top_k > 0 && o.top_k < kept.len() {
            kept.select_nth_unstable_by(o.top_k - 1, by_prob_desc);
            kept.truncate(o.top_k);
            kept.sort_unstable_by_key(|k| k.0);
        }
        if kept.is_empty() {
            return vec![(self.fallback(), 1.0)];
        }
        if temperature != 1.0 {
            let top = kept.iter().map(|k| k.1).fold(0.0, f32::max) as f64;
            let inv_t = 1.0 / temperature as f64;
            kept.iter_mut().for_each(|k| k.1 = (k.1 as f64 / top).powf(inv_t) as f32);
        }
        kept // a weight that underflowed to 0 is never drawn: the walk needs the sum to grow
    }

    /// The token returned when every logit is -inf or NaN (validate ensures one exists).
    fn fallback(&self) -> u32 {
        let o = &self.options;
        let dead = |t: u32| o.banned.contains(&t) || o.logit_bias.contains(&(t, f32::NEG_INFINITY));
        (0..self.vocab as u32).find(|&t| !dead(t)).unwrap_or(0)
    }
}

fn by_prob_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Softmax in f32 with an f64 denominator. NaN counts as -inf; +inf logits share all the
/// mass (the limit); all -inf gives all zeros.
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max); // f32::max skips NaN
    if max == f32::NEG_INFINITY {
        return vec![0.0; logits.len()];
    }
    let exp = |x: f32| if max == f32::INFINITY { (x == max) as u8 as f32 } else { (x - max).exp() };
    let mut e: Vec<f32> = logits.iter().map(|&x| if x.is_nan() { 0.0 } else { exp(x) }).collect();
    let inv_sum = 1.0 / mass(&e, |v| v);
    e.iter_mut().for_each(|v| *v = (*v as f64 * inv_sum) as f32);
    e
}

/// The official top-p cutoff: in descending order, the probability at which the running
/// sum first reaches `top_p`. Equivalently, and free of any order, the largest probability
/// v whose mass {p >= v} reaches `top_p`. No sort: non-negative f32s order like their bits,
/// so buckets of the top bits (exponent and 3 mantissa bits) are ranges of value; one pass
/// finds the bucket where the mass from the top reaches `top_p`, and a quickselect that
/// bucket. None when even the whole mass falls short (rounding, top_p near 1).
fn top_p_cutoff(probs: &[f32], top_p: f64) -> Option<f32> {
    let bucket = |p: f32| (p.to_bits() >> 20) as usize & 2047;
    let mut masses = [0.0f64; 2048];
    for &p in probs {
        masses[bucket(p)] += p as f64;
    }
    let mut above = 0.0;
    for b in (0..2048).rev() {
        if masses[b] > 0.0 && above + masses[b] >= top_p {
            let cand: Vec<f32> = probs.iter().copied().filter(|&p| p > 0.0 && bucket(p) == b).collect();
            let lowest = cand.iter().copied().fold(f32::INFINITY, f32::min);
            // Summed in another order the bucket may fall short by a rounding: then it all stays.
            return Some(select_cutoff(cand, above, top_p).unwrap_or(lowest));
        }
        above += masses[b];
    }
    None
}

/// The largest v in `cand` (all > 0) with `above` + mass {p >= v} >= top_p, where `above`
/// is the mass of the tokens larger than every candidate.
fn select_cutoff(mut cand: Vec<f32>, mut above: f64, top_p: f64) -> Option<f32> {
    let mut rng = Rng::new(cand.len() as u64); // random pivots: expected O(n) on any input
    while !cand.is_empty() {
        let pivot = cand[(rng.next_u64() % cand.len() as u64) as usize];
        let high = mass(&cand, |p| if p > pivot { p } else { 0.0 });
        let tied = mass(&cand, |p| if p == pivot { p } else { 0.0 });
        if high > 0.0 && above + high >= top_p {
            cand.retain(|&p| p > pivot);
        } else if above + high + tied >= top_p {
            return Some(pivot);
        } else {
            above += high + tied;
            cand.retain(|&p| p < pivot);
        }
    }
    None
}

/// The f64 sum of `f` over `xs`, with eight accumulators: one would wait on each addition.
fn mass<T: Copy>(xs: &[T], f: impl Fn(T) -> f32) -> f64 {
    let mut lanes = [0.0f64; 8];
    for chunk in xs.chunks(8) {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += f(x) as f64;
        }
    }
    lanes.iter().sum()
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64 as its authors advise.
#[derive(Clone)]
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut splitmix = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng([splitmix(), splitmix(), splitmix(), splitmix()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// RandomState is keyed from OS randomness (and differs per instance); the clock is mixed in too.
fn entropy_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    h.write_u128(now.map_or(0, |d| d.as_nanos()));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplingOptions), vocab: usize) -> Sampler {
        let mut o = SamplingOptions {
            top_p: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            banned: vec![],
            seed: Some(7),
            ..Default::default()
        };
        f(&mut o);
        Sampler::new(o, vocab).unwrap()
    }

    /// Logits whose softmax is exactly proportional to `weights`.
    fn logits_of(weights: &[f64]) -> Vec<f32> {
        weights.iter().map(|w| w.ln() as f32).collect()
    }

    fn assert_probs(got: &[f32], want: &[f64]) {
        let total: f64 = want.iter().sum();
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w / total).abs() < 1e-6, "token {i}: {g} vs {}\n{got:?}", w / total);
        }
    }

    #[test]
    fn greedy_is_argmax_and_ties_share() {
        let mut s = sampler(|o| o.temperature = 0.0, 5);
        let logits = [0.1, 3.0, -2.0, 2.9, 0.0];
        assert_eq!(s.probabilities(&logits), vec![0.0, 1.0, 0.0, 0.0, 0.0]);
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // The official keeps ties at the cutoff, so at temperature 0 too.
        assert_probs(&s.probabilities(&[1.0, 5.0, 5.0, 0.0]), &[0.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn top_p_cutoff_keeps_ties() {
        // 0.4, 0.2, 0.2, 0.2: the sum reaches 0.5 at the first 0.2, so every 0.2 survives.
        let logits = logits_of(&[0.4, 0.2, 0.2, 0.2]);
        assert_probs(&sampler(|o| o.top_p = 0.5, 4).probabilities(&logits), &[0.4, 0.2, 0.2, 0.2]);
        // 0.5, 0.3, 0.2: the first token reaches top_p 0.45, 0.6 needs two.
        let logits = logits_of(&[0.3, 0.5, 0.2]);
        assert_probs(&sampler(|o| o.top_p = 0.45, 3).probabilities(&logits), &[0.0, 1.0, 0.0]);
        assert_probs(&sampler(|o| o.top_p = 0.6, 3).probabilities(&logits), &[0.3, 0.5, 0.0]);
        assert_probs(&sampler(|o| o.top_p = 0.0, 3).probabilities(&logits), &[0.0, 1.0, 0.0]);
        assert_probs(&sampler(|o| o.top_p = 1.0, 3).probabilities(&logits), &[0.3, 0.5, 0.2]);
    }

    #[test]
    fn top_k_after_top_p() {
        let logits = logits_of(&[0.1, 0.4, 0.2, 0.3]);
        assert_probs(&sampler(|o| o.top_k = 2, 4).probabilities(&logits), &[0.0, 0.4, 0.0, 0.3]);
        assert_probs(&sampler(|o| o.top_k = 4, 4).probabilities(&logits), &[0.1, 0.4, 0.2, 0.3]);
        // Intersection: top-p keeps 0.4 and 0.3, top-k 3 cuts nothing more; top-k 1 does.
        let both = |k| sampler(|o| (o.top_p, o.top_k) = (0.6, k), 4).probabilities(&logits);
        assert_probs(&both(3), &[0.0, 0.4, 0.0, 0.3]);
        assert_probs(&both(1), &[0.0, 1.0, 0.0, 0.0]);
        // Ties at the k-th place keep the lowest ids.
        let tied = logits_of(&[0.2, 0.3, 0.2, 0.3]);
        assert_probs(&sampler(|o| o.top_k = 3, 4).probabilities(&tied), &[0.2, 0.3, 0.0, 0.3]);
    }

    #[test]
    fn temperature_comes_after_truncation() {
        // At temperature 1, 0.5 + 0.3 reach top_p 0.6. Sharpened first (T = 0.5 gives
        // 0.66, 0.24, 0.11) only one token would survive; the official keeps two, then squares.
        let logits = logits_of(&[0.5, 0.3, 0.2]);
        let p = sampler(|o| (o.top_p, o.temperature) = (0.6, 0.5), 3).probabilities(&logits);
        assert_probs(&p, &[0.25, 0.09, 0.0]);
        let p = sampler(|o| o.temperature = 2.0, 3).probabilities(&logits);
        assert_probs(&p, &[0.5f64.sqrt(), 0.3f64.sqrt(), 0.2f64.sqrt()]);
        // Tiny temperatures sharpen without underflowing to 0/0.
        let p = sampler(|o| o.temperature = 0.001, 3).probabilities(&logits);
        assert_eq!(p, vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn penalties_decay_then_count() {
        let mut s =
            sampler(|o| (o.presence_penalty, o.frequency_penalty, o.penalty_decay) = (0.5, 0.25, 0.5), 8);
        s.record(3, b"hi").unwrap();
        s.record(3, b"hi").unwrap(); // 1 * 0.5 + 1
        s.record(5, b" ").unwrap(); // whitespace: enters with 0
        s.record(6, b"12").unwrap(); // a substring of " \t0123456789": 0
        s.record(7, b"  ").unwrap(); // two spaces are not a substring: 1
        s.record(3, b"hi").unwrap(); // 1.5 * 0.5^4 + 1 (four decays since)
        assert_eq!(s.counts(), vec![(3, 1.09375), (5, 0.0), (6, 0.0), (7, 0.5)]);
        let mut logits = [1.0f32; 8];
        s.apply_penalties(&mut logits);
        let want = [1.0, 1.0, 1.0, 1.0 - 0.5 - 1.09375 * 0.25, 1.0, 0.5, 0.5, 1.0 - 0.5 - 0.125];
        assert_eq!(logits, want.map(|x: f64| x as f32));
        s.reset();
        assert!(s.counts().is_empty());
        for empty in [b"".as_slice(), b"\t0", b"789"] {
            s.record(1, empty).unwrap();
        }
        s.record(2, b" 1").unwrap(); // space then digit is not in the string
        assert_eq!(s.counts(), vec![(1, 0.0), (2, 1.0)]);
        // A token outside the vocabulary is refused and counts nothing, decays nothing.
        assert!(matches!(s.record(8, b"x"), Err(Error::Shape(m)) if m.contains("token 8 is outside")));
        assert_eq!(s.counts(), vec![(1, 0.0), (2, 1.0)]);
    }

    #[test]
    fn logits_are_whole_f32_values_one_per_token() {
        let s = sampler(|_| (), 3);
        let raw: Vec<u8> = [1.5f32, -2.0, 0.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(s.logits_from_le_bytes(&raw).unwrap(), vec![1.5, -2.0, 0.25]);
        for bad in [&raw[..11], &raw[..8], &[raw.as_slice(), &[0; 4]].concat()[..]] {
            assert!(matches!(s.logits_from_le_bytes(bad), Err(Error::Shape(_))), "{} bytes", bad.len());
        }
    }

    #[test]
    fn bans_and_bias() {
        let mut s =
            sampler(|o| (o.banned, o.logit_bias) = (vec![0, 2], vec![(1, -1.0), (3, f32::NEG_INFINITY)]), 5);
        let mut logits = [10.0f32, 2.0, 9.0, 8.0, 1.0];
        s.apply_penalties(&mut logits);
        assert_eq!(logits, [f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, f32::NEG_INFINITY, 1.0]);
        assert!((0..1000).all(|_| matches!(s.sample(&logits), 1 | 4)));
        // Garbage logits fall back to the first live token.
        assert_eq!(s.sample(&[f32::NAN; 5]), 1);
    }

    /// The device's draw applies the host's penalties as one entry per token, in id order,
    /// and takes the number `sample` would: the stream moves only with `drew_on_device`.
    #[test]
    fn device_draws_carry_the_hosts_penalties_and_number() {
        let mut s = sampler(
            |o| {
                (o.banned, o.logit_bias, o.seed) = (vec![0, 4], vec![(4, 2.0), (3, -1.5)], Some(9));
                (o.presence_penalty, o.frequency_penalty) = (0.5, 0.25);
            },
            6,
        );
        s.record(3, b"x").unwrap();
        s.record(5, b"y").unwrap();
        let d = s.device_draw();
        let logits = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut host = logits;
        s.apply_penalties(&mut host);
        let mut device = logits;
        for e in &d.entries {
            let l = &mut device[e.token as usize];
            *l = if e.banned { f32::NEG_INFINITY } else { (*l + e.bias) - e.penalty };
        }
        assert_eq!(device, host);
        assert_eq!(d.entries.iter().map(|e| e.token).collect::<Vec<_>>(), [0, 3, 4, 5]);
        assert_eq!((d.fallback, d.top_k, d.temperature), (1, 0, 1.0));
        // The same number until the device has drawn with it; then `sample`'s next one.
        assert_eq!(s.device_draw().u, d.u);
        let mut twin = s.clone();
        let u = twin.rng.next_f64();
        assert_eq!(d.u, u as f32);
        s.drew_on_device();
        assert_eq!(s.device_draw().u, twin.rng.next_f64() as f32);
    }

    #[test]
    fn seeded_draws_repeat() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32).sin() * 3.0).collect();
        let draws = |seed| {
            let mut s = sampler(|o| (o.seed, o.top_p) = (seed, 0.9), 1000);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draws(Some(1)), draws(Some(1)));
        assert_ne!(draws(Some(1)), draws(Some(2)));
        assert_ne!(draws(None), draws(None));
    }

    #[test]
    fn rng_matches_published_vectors() {
        let mut r = Rng([1, 2, 3, 4]);
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, [11520, 0, 1509978240, 1215971899390074240]);
        assert_eq!(Rng::new(0).0[..2], [0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4]);
        // splitmix64(0)
    }

    #[test]
    fn draws_follow_probabilities() {
        let logits = logits_of(&[0.05, 0.4, 0.25, 0.2, 0.1]);
        let mut s = sampler(|o| o.top_p = 0.9, 5);
        let p = s.probabilities(&logits);
        let n = 200_000;
        let mut hits = [0usize; 5];
        (0..n).for_each(|_| hits[s.sample(&logits) as usize] += 1);
        // Each count is Binomial(n, p): sd <= sqrt(n)/2 ~ 224. Six sd (1350) fails by chance
        // with probability ~1e-9 per token (and the seed is fixed); a wrong cutoff or a biased
        // draw is off by >= 0.05 * n = 10000.
        for (i, (&h, &q)) in hits.iter().zip(&p).enumerate() {
            let sd = (n as f64 * q as f64 * (1.0 - q as f64)).sqrt();
            assert!((h as f64 - n as f64 * q as f64).abs() <= 6.0 * sd, "token {i}: {h} draws for p={q}");
        }
        assert_eq!(hits[0], 0);
    }

    #[test]
    fn top_p_cutoff_equals_full_sort() {
        // 65536 pseudo-random logits, flat to peaked, some with many ties (rounded logits),
        // against the plain rule: sort, running sum, first index reaching top_p.
        let mut rng = Rng::new(3);
        for (scale, step) in [(0.5f32, 0.0f32), (4.0, 0.0), (12.0, 0.0), (4.0, 0.5), (30.0, 3.0)] {
            let logits: Vec<f32> = (0..65536)
                .map(|_| (rng.next_f64() as f32 - 0.5) * 2.0 * scale)
                .map(|l| if step > 0.0 { (l / step).round() * step } else { l })
                .collect();
            let probs = softmax(&logits);
            let mut sorted = probs.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            for top_p in [0.0, 0.3, 0.85, 0.999, 0.999_999] {
                let mut acc = 0.0;
                let want = sorted.iter().copied().find(|&p| {
                    acc += p as f64;
                    acc >= top_p
                });
                assert_eq!(top_p_cutoff(&probs, top_p), want, "scale {scale} step {step} top_p {top_p}");
            }
        }
    }

    #[test]
    fn validation_names_the_value() {
        let err = |f: fn(&mut SamplingOptions)| {
            let mut o = SamplingOptions::default();
            f(&mut o);
            match o.validate(10) {
                Err(Error::Invalid(message)) => message,
                other => panic!("{other:?}"),
            }
        };
        assert!(err(|o| o.temperature = -1.0).contains("temperature -1"));
        assert!(err(|o| o.top_p = 1.5).contains("top_p 1.5"));
        assert!(err(|o| o.top_p = f32::NAN).contains("top_p NaN"));
        assert!(err(|o| o.penalty_decay = 2.0).contains("penalty_decay 2"));
        assert!(err(|o| o.frequency_penalty = f32::INFINITY).contains("frequency_penalty inf"));
        assert!(err(|o| o.banned = vec![10]).contains("banned token 10"));
        assert!(err(|o| o.logit_bias = vec![(1, 1.0), (1, 2.0)]).contains("token 1 twice"));
        assert!(err(|o| o.logit_bias = vec![(2, f32::NAN)]).contains("logit_bias NaN"));
        assert!(err(|o| o.banned = (0..10).collect()).contains("all 10 tokens"));
        assert!(SamplingOptions::default().validate(0).is_err());
        assert!(SamplingOptions::default().validate(65536).is_ok());
    }
}
