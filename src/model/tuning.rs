//! Kernel choices timed on the model's own matrices, the first time a model shape meets
//! an adapter: each candidate runs decode steps of this model, round after round, for at
//! most `BUDGET` in all (the first, untimed round compiles); the fastest median wins and is kept on disk
//! (`gpu::tuning_cache`), so later loads of the shape on that adapter only look it up.
//! Only variants whose results are bit-identical are candidates, so the choice changes
//! speed, never outputs. `RWKV_GPU_TUNE=off` keeps the defaults.
//!
//! Candidates today, each dimension where it applies (all combinations are timed):
//! - how NF4 codes are decoded (a workgroup table or a select tree), for models holding
//!   NF4 matrices; the device type gives the default;
//! - the parts the decode value projection is split into along K (`ops::Split`: 1, 2 or
//!   4), on GPUs, for models whose value projection can be split. Not on CPU drivers:
//!   there the grid's workgroups outnumber the cores many times over already.
//!
//! The NF4 decodings give bit-identical results; split sums add the same products in
//! another order, equal within float rounding (tests/test_split_k.py decodes under each).
//! A run with the same choice is bit-identical to the last.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::forward::Want;
use super::Model;
use crate::error::Result;
use crate::gpu::tuning_cache::{self, Choice, TuningCache};
use crate::gpu::variants::Nf4Lookup;
use crate::model::ops;
use crate::model::weights::WeightFormat;

/// The most a load spends timing candidates (compilation of their kernels included).
pub const BUDGET: Duration = Duration::from_secs(2);
/// Timed rounds enough for a median (small models stop here, well within the budget).
const ROUNDS: usize = 9;
/// Parts of the split value projection timed on GPUs (1: not split).
const SPLIT_CANDIDATES: [usize; 3] = [1, 2, 4];

/// Where the model's kernel choices came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Nothing to choose for this model on this device: the device's defaults.
    Default,
    /// The caller fixed them (`RWKV_GPU_NF4_LOOKUP`, `RWKV_GPU_SPLIT_K`).
    Forced,
    /// `RWKV_GPU_TUNE=off`: the defaults, untimed.
    Off,
    /// Read from the cache file.
    Cached,
    /// Timed during this load.
    Timed,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::Forced => "forced",
            Source::Off => "off",
            Source::Cached => "cached",
            Source::Timed => "timed",
        }
    }
}

/// What tuning did for a model: the source of its choices and any warning about the
/// cache file (shown to the caller once, with the load's other warnings).
#[derive(Debug, Clone)]
pub struct Tuning {
    pub source: Source,
    pub warnings: Vec<String>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning { source: Source::Default, warnings: Vec::new() }
    }
}

fn tuning_off() -> bool {
    std::env::var("RWKV_GPU_TUNE").is_ok_and(|v| v.trim() == "off" || v.trim() == "0")
}

impl Model {
    /// How this model's kernels decode NF4 codes.
    pub fn nf4_lookup(&self) -> Nf4Lookup {
        if self.nf4_select.load(Ordering::Relaxed) {
            Nf4Lookup::Select
        } else {
            Nf4Lookup::Table
        }
    }

    /// Parts the decode value projection is split into along K (1: not split).
    pub fn split_k(&self) -> usize {
        self.split_k.load(Ordering::Relaxed)
    }

    fn apply(&self, choice: Choice) {
        self.nf4_select.store(choice.nf4_lookup == Nf4Lookup::Select, Ordering::Relaxed);
        self.split_k.store(choice.split_k, Ordering::Relaxed);
    }

    /// The candidates of each dimension (see the module notes), the default first.
    fn candidates(&self) -> (Vec<Nf4Lookup>, Vec<usize>) {
        let has_nf4 = self.weights.head.format == WeightFormat::Nf4
            || self.weights.layers.iter().any(|l| l.key.format == WeightFormat::Nf4);
        let default = self.ctx.nf4_lookup;
        let nf4 = if has_nf4 && !self.ctx.nf4_forced {
            let other = match default {
                Nf4Lookup::Table => Nf4Lookup::Select,
                Nf4Lookup::Select => Nf4Lookup::Table,
            };
            vec![default, other]
        } else {
            vec![default]
        };
        let splittable = |parts: usize| {
            parts == 1
                || (self.weights.layers.len() > 1
                    && self.weights.layers.iter().any(|l| ops::can_split(&l.ffn_value, parts)))
        };
        let split = match self.ctx.split_k_forced {
            Some(parts) => vec![parts],
            None if self.ctx.adapter.device_type != "cpu" => {
                SPLIT_CANDIDATES.into_iter().filter(|&p| splittable(p)).collect()
            }
            None => vec![1],
        };
        (nf4, split)
    }

    /// The shape part of the cache key: what the timed kernels are a function of, and the
    /// candidates (a choice made among fewer, by an older version, is timed again).
    fn tuning_shape(&self, candidates: &[Choice]) -> String {
        let c = &self.config;
        let formats: Vec<&str> = self.weights.layers.iter().map(|l| l.key.format.name()).collect();
        let head = self.weights.head.format.name();
        let timed: Vec<String> = candidates.iter().map(|c| c.to_text()).collect();
        format!(
            "L{} C{} F{} V{} {} head {head} among {}",
            c.n_layer,
            c.n_embd,
            c.ffn_size,
            c.vocab_size,
            formats.join(","),
            timed.join(";")
        )
    }

    /// Chooses the kernel variants (see the module notes); called once, at load.
    pub(crate) fn tune(&self) -> Result<()> {
        let (nf4, split) = self.candidates();
        let candidates: Vec<Choice> = nf4
            .iter()
            .flat_map(|&nf4_lookup| split.iter().map(move |&split_k| Choice { nf4_lookup, split_k }))
            .collect();
        let forced = self.ctx.nf4_forced || self.ctx.split_k_forced.is_some();
        let source = if candidates.len() > 1 && !tuning_off() {
            return self.time_choices(&candidates);
        } else if candidates.len() > 1 {
            Source::Off
        } else if forced {
            Source::Forced
        } else {
            Source::Default
        };
        self.apply(candidates[0]);
        self.record_tuning(source, Vec::new());
        Ok(())
    }

    fn record_tuning(&self, source: Source, warnings: Vec<String>) {
        *self.tuning.lock().unwrap_or_else(|p| p.into_inner()) = Tuning { source, warnings };
    }

    /// Times `candidates` (the default first) unless the cache holds the choice.
    fn time_choices(&self, candidates: &[Choice]) -> Result<()> {
        let key = tuning_cache::key(&self.ctx.adapter, &self.tuning_shape(candidates));
        let cache = TuningCache::open();
        let found = cache.as_ref().map(|c| c.lookup(&key));
        let warnings: Vec<String> = found.iter().filter_map(|f| f.warning.clone()).collect();
        if let Some(choice) = found.as_ref().and_then(|f| f.choice) {
            self.apply(choice);
            self.record_tuning(Source::Cached, warnings);
            return Ok(());
        }
        let default = candidates[0];
        // One decode step at a time, candidates in turn so that a change in the machine's
        // speed hits both alike; the first step of each compiles and records (untimed).
        let state = self.new_state()?;
        let started = Instant::now();
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); candidates.len()];
        // The untimed round, then timed rounds while the next one (as long as the last)
        // still ends within the budget. No timed round (a slow device, a big model): the
        // default.
        let mut round = 0;
        let mut last = Duration::ZERO;
        while round == 0 || (round <= ROUNDS && started.elapsed() + last <= BUDGET) {
            let round_started = Instant::now();
            for (i, &choice) in candidates.iter().enumerate() {
                self.apply(choice);
                let step = Instant::now();
                self.forward(&state, &[0], Want::Argmax)?;
                if round > 0 {
                    times[i].push(step.elapsed().as_secs_f64());
                }
            }
            round += 1;
            last = round_started.elapsed();
        }
        let median = |t: &Vec<f64>| {
            let mut t = t.clone();
            t.sort_by(f64::total_cmp);
            t.get(t.len() / 2).copied().unwrap_or(f64::INFINITY)
        };
        let best = (0..candidates.len())
            .min_by(|&a, &b| median(&times[a]).total_cmp(&median(&times[b])))
            .map_or(default, |i| candidates[i]);
        self.apply(best);
        if let (Some(cache), Some(found)) = (cache, found) {
            cache.store(found, &key, best);
        }
        self.record_tuning(Source::Timed, warnings);
        Ok(())
    }
}
