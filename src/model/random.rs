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
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
        let mut state = self.seed
            ^ name
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let n: usize = shape.iter().product();
        let mut out = Vec::with_capacity(n * 2);
        for _ in 0..n {
            let u = (splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            let v = centre + half * (2.0 * u - 1.0);
            out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
        }
        Ok(Cow::Owned(out))
    }
    fn path(&self) -> &Path {
        &self.path
    }
}
