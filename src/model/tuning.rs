//! Kernel choices timed on the model's own matrices, the first time a model shape meets
//! an adapter: candidates run decode steps of this model, round after round, and the
//! fastest median wins; the choice is kept on disk (`gpu::tuning_cache`), so later loads
//! of the shape on that adapter only look it up. `RWKV_GPU_TUNE=off` keeps the defaults.
//!
//! The dimensions, each where it applies:
//! - how NF4 codes are decoded (a workgroup table or a select tree), for models holding
//!   NF4 matrices; the device type gives the default;
//! - the parts the decode value projection is split into along K (`ops::Split`: 1, 2 or
//!   4), for models whose value projection can be split;
//! - the matrix-vector kernel's workgroups (`MatvecShape`): threads (32/64 fitted to the
//!   rows, or 128), rows (8 or 4), steps each thread loads at once (1 or 2) and
//!   reduction (subgroupAdd or a tree).
//!
//! All but NF4 decoding are timed on GPUs only: on CPU drivers the grid's workgroups
//! outnumber the cores many times over, and each of those dimensions has one answer
//! there (measured on lavapipe: narrow workgroups, 8 rows, no split).
//! `RWKV_GPU_TUNE=all` times them on every device (tests, and the curious).
//!
//! The dimensions are timed one after another (coordinate descent: each with the best of
//! those before it), the default first, so the cost grows with their sum, not their
//! product. Each gets an equal share of what is left of `BUDGET`, and at least one
//! untimed round (it compiles and records); once the budget is spent, the dimensions not
//! reached keep their defaults. On CPU drivers, where a decode step of a 0.1B model takes
//! a quarter of a second, that happens early; on GPUs a step takes milliseconds.
//! NF4 decodings, matvec rows and depths do the same arithmetic (the same bits, unless a
//! driver fuses a multiply-add in one variant and not the other); splits, lanes and
//! reductions add the same products in another order, equal within float rounding (the
//! golden tests decode under each). A run with the same choice is bit-identical to the
//! last.

use std::time::{Duration, Instant};

use super::forward::Want;
use super::Model;
use crate::error::Result;
use crate::gpu::context::{GpuContext, TuneMode};
use crate::gpu::tuning_cache::{self, Choice, TuningCache};
use crate::gpu::variants::{MatvecLanes, MatvecShape, Nf4Lookup, Reduction, MATVEC_DEPTHS, MATVEC_ROWS};
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
    /// The caller fixed them (`RWKV_GPU_NF4_LOOKUP`, `_SPLIT_K`, `_MATVEC_LANES`,
    /// `_MATVEC_ROWS`, `_MATVEC_DEPTH`).
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

/// The device's defaults, with what the caller fixed: a model's choice before tuning.
pub fn device_default(ctx: &GpuContext) -> Choice {
    Choice { nf4_lookup: ctx.nf4_lookup, split_k: ctx.split_k_forced.unwrap_or(1), matvec: ctx.matvec }
}

/// One value of one dimension of the choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    Nf4(Nf4Lookup),
    Split(usize),
    Lanes(MatvecLanes),
    Rows(u32),
    Depth(u32),
    Reduce(Reduction),
}

impl Setting {
    fn apply(self, mut choice: Choice) -> Choice {
        match self {
            Setting::Nf4(lookup) => choice.nf4_lookup = lookup,
            Setting::Split(parts) => choice.split_k = parts,
            Setting::Lanes(lanes) => choice.matvec.lanes = lanes,
            Setting::Rows(rows) => choice.matvec.rows = rows,
            Setting::Depth(depth) => choice.matvec.depth = depth,
            Setting::Reduce(reduction) => choice.matvec.reduction = reduction,
        }
        choice
    }

    /// The value as the cache key lists it.
    fn value(self) -> String {
        match self {
            Setting::Nf4(lookup) => lookup.name().into(),
            Setting::Split(parts) => parts.to_string(),
            Setting::Lanes(lanes) => lanes.name().into(),
            Setting::Rows(rows) => rows.to_string(),
            Setting::Depth(depth) => depth.to_string(),
            Setting::Reduce(reduction) => reduction.name().into(),
        }
    }
}

/// The candidates of one dimension, the default first.
struct Dimension {
    name: &'static str,
    values: Vec<Setting>,
}

impl Model {
    /// The kernel variants this model runs (`tuning_cache::Choice`).
    pub fn choice(&self) -> Choice {
        *self.choice.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How this model's kernels decode NF4 codes.
    pub fn nf4_lookup(&self) -> Nf4Lookup {
        self.choice().nf4_lookup
    }

    /// Parts the decode value projection is split into along K (1: not split).
    pub fn split_k(&self) -> usize {
        self.choice().split_k
    }

    /// The matrix-vector kernel's workgroups.
    pub fn matvec_shape(&self) -> MatvecShape {
        self.choice().matvec
    }

    fn apply(&self, choice: Choice) {
        *self.choice.lock().unwrap_or_else(|p| p.into_inner()) = choice;
    }

    /// Every dimension (see the module notes), each with its candidates, the default
    /// first; a dimension with one candidate is not timed.
    fn dimensions(&self, mode: TuneMode) -> Vec<Dimension> {
        let ctx = &self.ctx;
        let default = device_default(ctx);
        // Beyond NF4 decoding: timed on GPUs, or everywhere when asked.
        let timed_here = ctx.adapter.device_type != "cpu" || mode == TuneMode::All;
        let has_nf4 = self.weights.head.format == WeightFormat::Nf4
            || self.weights.layers.iter().any(|l| l.key.format == WeightFormat::Nf4);
        let nf4 = if has_nf4 && !ctx.nf4_forced {
            let other = match default.nf4_lookup {
                Nf4Lookup::Table => Nf4Lookup::Select,
                Nf4Lookup::Select => Nf4Lookup::Table,
            };
            vec![default.nf4_lookup, other]
        } else {
            vec![default.nf4_lookup]
        };
        let splittable = |parts: usize| {
            parts == 1
                || (self.weights.layers.len() > 1
                    && self.weights.layers.iter().any(|l| ops::can_split(&l.ffn_value, parts)))
        };
        let split = match (ctx.split_k_forced, timed_here) {
            (Some(parts), _) => vec![parts],
            (None, true) => SPLIT_CANDIDATES.into_iter().filter(|&p| splittable(p)).collect(),
            (None, false) => vec![1],
        };
        let lanes = if ctx.matvec_lanes_forced || !timed_here {
            vec![default.matvec.lanes]
        } else {
            // The device's default first; 8 lanes only where the device is a CPU.
            let cpu = ctx.adapter.device_type == "cpu";
            let others = [MatvecLanes::Narrow, MatvecLanes::Wide, MatvecLanes::Widest]
                .into_iter()
                .filter(|&l| l != default.matvec.lanes && (cpu || l != MatvecLanes::Narrow));
            std::iter::once(default.matvec.lanes).chain(others).collect()
        };
        let rows = if ctx.matvec_rows_forced || !timed_here {
            vec![default.matvec.rows]
        } else {
            MATVEC_ROWS.to_vec()
        };
        let depth = if ctx.matvec_depth_forced || !timed_here {
            vec![default.matvec.depth]
        } else {
            MATVEC_DEPTHS.to_vec()
        };
        // Without subgroups the default is the tree, and the tree is all there is.
        let reduce = if ctx.subgroups && timed_here {
            vec![Reduction::Subgroup, Reduction::Tree]
        } else {
            vec![default.matvec.reduction]
        };
        // In the order they are timed: those that touch the most weight bytes first (the
        // matvec runs every matrix of decode but the value projection).
        vec![
            Dimension { name: "nf4", values: nf4.into_iter().map(Setting::Nf4).collect() },
            Dimension { name: "lanes", values: lanes.into_iter().map(Setting::Lanes).collect() },
            Dimension { name: "rows", values: rows.into_iter().map(Setting::Rows).collect() },
            Dimension { name: "depth", values: depth.into_iter().map(Setting::Depth).collect() },
            Dimension { name: "reduce", values: reduce.into_iter().map(Setting::Reduce).collect() },
            Dimension { name: "split", values: split.into_iter().map(Setting::Split).collect() },
        ]
    }

    /// The shape part of the cache key: what the timed kernels are a function of, and the
    /// candidates (a choice made among others, by an older version, is timed again).
    fn tuning_shape(&self, dimensions: &[Dimension]) -> String {
        let c = &self.config;
        let formats: Vec<&str> = self.weights.layers.iter().map(|l| l.key.format.name()).collect();
        let head = self.weights.head.format.name();
        let timed: Vec<String> = dimensions
            .iter()
            .map(|d| {
                format!("{}={}", d.name, d.values.iter().map(|v| v.value()).collect::<Vec<_>>().join(","))
            })
            .collect();
        format!(
            "L{} C{} F{} V{} {} head {head} among {}",
            c.n_layer,
            c.n_embd,
            c.ffn_size,
            c.vocab_size,
            formats.join(","),
            timed.join(" ")
        )
    }

    /// Chooses the kernel variants (see the module notes); called once, at load.
    pub(crate) fn tune(&self) -> Result<()> {
        let mode = self.ctx.tune;
        let dimensions = self.dimensions(mode);
        let ctx = &self.ctx;
        let anything_to_time = dimensions.iter().any(|d| d.values.len() > 1);
        let forced = ctx.nf4_forced
            || ctx.split_k_forced.is_some()
            || ctx.matvec_lanes_forced
            || ctx.matvec_rows_forced
            || ctx.matvec_depth_forced;
        self.apply(device_default(ctx));
        let source = if anything_to_time && mode != TuneMode::Off {
            return self.time_choices(&dimensions);
        } else if anything_to_time {
            Source::Off
        } else if forced {
            Source::Forced
        } else {
            Source::Default
        };
        self.record_tuning(source, Vec::new());
        Ok(())
    }

    fn record_tuning(&self, source: Source, warnings: Vec<String>) {
        *self.tuning.lock().unwrap_or_else(|p| p.into_inner()) = Tuning { source, warnings };
    }

    /// Times the dimensions in turn unless the cache holds the choice.
    fn time_choices(&self, dimensions: &[Dimension]) -> Result<()> {
        let key = tuning_cache::key(&self.ctx.adapter, &self.tuning_shape(dimensions));
        let cache = TuningCache::open();
        let found = cache.as_ref().map(|c| c.lookup(&key));
        let warnings: Vec<String> = found.iter().filter_map(|f| f.warning.clone()).collect();
        if let Some(choice) = found.as_ref().and_then(|f| f.choice) {
            self.apply(choice);
            self.record_tuning(Source::Cached, warnings);
            return Ok(());
        }
        let state = self.new_state()?;
        let started = Instant::now();
        let timed: Vec<&Dimension> = dimensions.iter().filter(|d| d.values.len() > 1).collect();
        let mut best = device_default(&self.ctx);
        for (i, dimension) in timed.iter().enumerate() {
            // What is left of the budget, shared among the dimensions left; none left (a
            // slow device, a big model): the defaults of the dimensions not reached.
            let left = BUDGET.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let share = left / (timed.len() - i) as u32;
            let candidates: Vec<Choice> = dimension.values.iter().map(|v| v.apply(best)).collect();
            best = self.fastest(&state, &candidates, share)?;
        }
        self.apply(best);
        if let (Some(cache), Some(found)) = (cache, found) {
            cache.store(found, &key, best);
        }
        self.record_tuning(Source::Timed, warnings);
        Ok(())
    }

    /// The candidate (the default first) whose median decode step is the shortest: one
    /// step at a time, candidates in turn so that a change in the machine's speed hits
    /// all alike; an untimed round first, which compiles and records, then timed rounds
    /// while the next one (as long as the last) still ends within `budget`. No timed
    /// round (a slow device, a big model): the default.
    fn fastest(
        &self,
        state: &super::state::State,
        candidates: &[Choice],
        budget: Duration,
    ) -> Result<Choice> {
        let started = Instant::now();
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); candidates.len()];
        let mut round = 0;
        let mut last = Duration::ZERO;
        while round == 0 || (round <= ROUNDS && started.elapsed() + last <= budget) {
            let round_started = Instant::now();
            for (i, &choice) in candidates.iter().enumerate() {
                self.apply(choice);
                let step = Instant::now();
                self.forward(state, &[0], Want::Argmax)?;
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
        Ok((0..candidates.len())
            .min_by(|&a, &b| median(&times[a]).total_cmp(&median(&times[b])))
            .map_or(candidates[0], |i| candidates[i]))
    }
}
