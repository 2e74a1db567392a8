//! `Model.random`: an in-memory checkpoint with the official tensor names and widths and
//! real-model-like value ranges, generated one tensor at a time from a seed. Speed does
//! not depend on the values; this exists so benchmarks need no download.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use super::config::Config;
use crate::error::{Error, Result};
use crate::loader::{Checkpoint, DType, TensorInfo};

pub struct RandomCheckpoint {
    seed: u64,
    names: Vec<(String, Vec<usize>)>,
    path: PathBuf,
}

impl RandomCheckpoint {
    pub fn new(config: Config, seed: u64) -> RandomCheckpoint {
        let names = crate::schema::expected(&config).into_iter().map(|x| (x.name, x.shape)).collect();
        RandomCheckpoint { seed, names, path: PathBuf::from("<random>") }
    }

    /// (centre, half-width) of the uniform distribution for a tensor.
    fn range(&self, name: &str, shape: &[usize]) -> (f32, f32) {
        let last = name
            .rsplit('.')
            .nth(if name.ends_with("weight") || name.ends_with("bias") { 1 } else { 0 })
            .unwrap_or("");
        let fan_in = if shape.len() == 2 { shape[1] as f32 } else { 1.0 };
        match last {
            _ if name.ends_with(".bias") => (0.0, 0.1),
            "ln0" | "ln1" | "ln2" | "ln_x" | "ln_out" => (1.0, 0.2),
            "x_r" | "x_w" | "x_k" | "x_v" | "x_a" | "x_g" => (0.5, 0.4),
            "w0" => (-3.0, 2.0),
            "a0" | "v0" => (0.0, 1.0),
            "k_k" => (0.8, 0.2),
            "k_a" => (1.0, 0.1),
            "r_k" => (0.0, 0.5),
            "emb" => (0.0, 0.5),
            _ if shape.len() == 2 && name.contains(".att.") && !name.ends_with("weight") => {
                (0.0, 1.0 / (shape[0] as f32).sqrt())
            }
            _ => (0.0, 1.0 / fan_in.sqrt()),
        }
    }
}

/// splitmix64: small, fast and good enough for weights nobody will read.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GAMMA);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` (fp16 values, little-endian) with the uniform values of the splitmix
/// stream that starts at `state`, centred on `centre`, `half` either side, one part per
/// core for a big tensor (a 2.9B model is ~3e9 values, and the benches build one per
/// process).
fn fill_uniform(out: &mut [u8], state: u64, centre: f32, half: f32) {
    // Parts of at least 1 Mi values: below that a thread costs more than it saves.
    let parts = crate::parallel::cores().min(out.len() >> 21).max(1);
    fill_uniform_in_parts(out, state, centre, half, parts);
}

/// Value i depends only on `state + (i + 1) * GAMMA`, so each part starts its stream
/// there and the values do not depend on how many parts there are.
fn fill_uniform_in_parts(out: &mut [u8], state: u64, centre: f32, half: f32, parts: usize) {
    let fill_part = |part: &mut [u8], first: usize| {
        let mut s = state.wrapping_add((first as u64).wrapping_mul(GAMMA));
        for pair in part.chunks_exact_mut(2) {
            let u = (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            let v = centre + half * (2.0 * u - 1.0);
            pair.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
        }
    };
    if parts <= 1 {
        return fill_part(out, 0);
    }
    let per_part = (out.len() / 2).div_ceil(parts).max(1);
    let parts: Vec<_> = out.chunks_mut(2 * per_part).enumerate().collect();
    let threads = parts.len();
    crate::parallel::map(parts, threads, |(i, part)| fill_part(part, i * per_part));
}

impl Checkpoint for RandomCheckpoint {
    fn names(&self) -> Vec<String> {
        self.names.iter().map(|(n, _)| n.clone()).collect()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.names
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| TensorInfo { dtype: DType::F16, shape: s.clone() })
    }
    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let shape = self
            .names
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| Error::load(&self.path, format!("missing tensor {name:?}")))?;
        let (centre, half) = self.range(name, &shape);
        let state = self.seed
            ^ name
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let n: usize = shape.iter().product();
        let mut out = vec![0u8; n * 2];
        fill_uniform(&mut out, state, centre, half);
        Ok(Cow::Owned(out))
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_do_not_depend_on_the_parts() {
        // 1001 values: parts of 143 (7), 91 (11) and 1 (1001, one value each).
        let mut one = vec![0u8; 2002];
        fill_uniform_in_parts(&mut one, 42, 0.5, 0.25, 1);
        assert!(one.chunks_exact(2).any(|p| p != [0, 0]), "nothing was written");
        for parts in [2, 7, 11, 1001, 5000] {
            let mut split = vec![0u8; 2002];
            fill_uniform_in_parts(&mut split, 42, 0.5, 0.25, parts);
            assert_eq!(one, split, "{parts} parts");
        }
        // A one-value stream starting at value 1000 is the last value of the whole.
        let mut last = [0u8; 2];
        fill_uniform_in_parts(&mut last, 42u64.wrapping_add(1000u64.wrapping_mul(GAMMA)), 0.5, 0.25, 1);
        assert_eq!(last, one[2000..]);
    }
}
