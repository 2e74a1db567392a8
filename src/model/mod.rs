//! The RWKV-7 model on the device: weights, state pool, and the forward pass plan.

mod bandwidth;
mod chunks;
pub mod config;
pub mod coop_check;
mod forward;
mod head;
mod host_memory;
pub mod host_table;
mod load;
mod ops;
pub mod random;
pub mod saved;
mod scratch;
pub mod state;
pub mod state_file;
pub mod tuning;
pub mod weights;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use config::Config;
pub use forward::Want;
pub use state::State;
pub use weights::{Quantization, WeightFormat};

use crate::error::{Error, Result};
use crate::fair_mutex::{FairGuard, FairMutex};
use crate::gpu::{DeviceOptions, GpuContext, Pipelines};
use crate::interrupt::Interrupt;
use crate::loader::{self, Checkpoint};
use crate::sampler::DeviceDraw;
use load::Loader;
use scratch::Scratch;
use state::StatePool;
use weights::Weights;

static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

/// Texts `embed` feeds in one batch at most: enough to share the weight reads, few enough
/// that their states (21.6 MB each at 2560 wide) stay small next to the weights.
const EMBED_BATCH: usize = 16;

/// Counts from the last forward call, for profiling and for tests that guard them.
#[derive(Debug, Default, Clone)]
pub struct CallStats {
    pub submissions: usize,
    pub dispatches: usize,
    pub readbacks: usize,
    /// Dispatches recorded for the layers (ln0 and the head excluded), all chunks.
    pub layer_dispatches: usize,
    /// With profiling on and timestamp queries available: GPU nanoseconds per dispatch,
    /// under the kernel variant's name, in order.
    pub timings: Vec<(std::sync::Arc<str>, f64, u64)>,
    /// Host time spent preparing and submitting the chunks (recording on a chunk shape's
    /// first call, uploads, encoding where no command buffer was encoded ahead, the
    /// submission), waits for the GPU and encoding ahead excluded.
    pub host_ns: u64,
}

impl CallStats {
    fn merge(&mut self, other: CallStats) {
        self.submissions += other.submissions;
        self.dispatches += other.dispatches;
        self.readbacks += other.readbacks;
        self.layer_dispatches += other.layer_dispatches;
        self.timings.extend(other.timings);
        self.host_ns += other.host_ns;
    }

    /// Counts one submission.
    fn add(&mut self, counts: crate::gpu::recorder::Counts) {
        self.submissions += 1;
        self.dispatches += counts.dispatches;
        self.timings.extend(counts.timings);
    }
}

pub struct Model {
    pub ctx: Arc<GpuContext>,
    pub config: Config,
    pub weights: Weights,
    pub pool: Arc<StatePool>,
    pipelines: Pipelines,
    /// Scratch activations, reused by every call. Calls on one model run one at a time;
    /// a Model may be shared between threads and they take turns here.
    /// Taken in turn (first come, first served): see `fair_mutex`.
    scratch: FairMutex<Option<Scratch>>,
    pub id: u64,
    pub last_stats: Mutex<CallStats>,
    /// Time every dispatch on the GPU (see `Recorder::profile`); off by default.
    pub profiling: std::sync::atomic::AtomicBool,
    /// Sparse products count the rows they read (`read_counts`); off by default.
    pub counting_reads: std::sync::atomic::AtomicBool,
    /// The kernel variants chosen for this model on this device (`tuning.rs`).
    choice: Mutex<crate::gpu::tuning_cache::Choice>,
    /// Where the kernel choices came from, and warnings about the cache file.
    pub tuning: Mutex<tuning::Tuning>,
    /// Prefill products run on cooperative matrices (`coop_check.rs`), and why or why not.
    coop_matrix: std::sync::atomic::AtomicBool,
    pub matmul_choice: Mutex<coop_check::MatmulChoice>,
}

/// What the sparse value projection of one layer read since the counters were last
/// taken: groups of four inputs read and seen, non-zero inputs and inputs (summed over
/// the tokens of each call).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCounts {
    pub groups_read: u64,
    pub groups: u64,
    pub nonzero_inputs: u64,
    pub inputs: u64,
}

/// What the caller asks for: one format for every layer or one per layer, and the head's.
/// `None` (the default): as the file holds them, which is fp16 unless it is a saved
/// quantized model.
#[derive(Debug, Clone, Default)]
pub struct QuantSpec {
    pub layers: Option<Vec<WeightFormat>>,
    pub head: Option<WeightFormat>,
}

impl QuantSpec {
    /// One format for all layers (a list of one), or exactly one per layer.
    fn resolve(&self, n_layer: usize) -> Result<Quantization> {
        let layers = match self.layers.as_deref() {
            None => vec![None; n_layer],
            Some([one]) => vec![Some(*one); n_layer],
            Some(list) if list.len() == n_layer => list.iter().copied().map(Some).collect(),
            Some(list) => {
                return Err(Error::Invalid(format!(
                    "layer_dtypes has {} entries; this model has {n_layer} layers",
                    list.len()
                )))
            }
        };
        if self.head == Some(WeightFormat::Nf4) {
            return Err(Error::Invalid("the head can be fp16 or int8, not nf4".into()));
        }
        Ok(Quantization { layers, head: self.head })
    }
}

/// How `embed` turns a sequence's hidden states into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Last,
    Mean,
}

impl Pooling {
    pub fn parse(name: &str) -> Result<Pooling> {
        match name {
            "last" => Ok(Pooling::Last),
            "mean" => Ok(Pooling::Mean),
            other => Err(Error::Invalid(format!("pooling must be 'last' or 'mean', got {other:?}"))),
        }
    }
}

/// Per-layer state as host arrays, f32: att_shift [L, C], wkv [L, H, N, N], ffn_shift [L, C].
pub struct HostState {
    pub att_shift: Vec<f32>,
    pub wkv: Vec<f32>,
    pub ffn_shift: Vec<f32>,
}

impl HostState {
    /// From the little-endian f32 bytes of each part; a length that is not a whole number
    /// of f32 values is refused (not padded).
    pub fn from_le_bytes(att_shift: &[u8], wkv: &[u8], ffn_shift: &[u8]) -> Result<HostState> {
        let values = |name: &str, bytes: &[u8]| -> Result<Vec<f32>> {
            if !bytes.len().is_multiple_of(4) {
                return Err(Error::Shape(format!(
                    "state {name} has {} bytes: not a whole number of f32 values",
                    bytes.len()
                )));
            }
            Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        Ok(HostState {
            att_shift: values("att_shift", att_shift)?,
            wkv: values("wkv", wkv)?,
            ffn_shift: values("ffn_shift", ffn_shift)?,
        })
    }
}

impl Model {
    pub fn open(
        path: &Path,
        options: &DeviceOptions,
        quant: &QuantSpec,
        progress: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Model> {
        let ck = loader::open(path)?;
        Self::from_checkpoint(ck.into(), options, quant, progress)
    }

    /// A model of the official shape (`Config::official`) with random weights. The sizes
    /// are checked against the library's bounds before anything is built from them;
    /// `progress` as for `from_checkpoint`.
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        n_layer: usize,
        n_embd: usize,
        vocab_size: usize,
        seed: u64,
        options: &DeviceOptions,
        quant: &QuantSpec,
        progress: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Model> {
        use crate::schema::{MAX_EMBD, MAX_LAYERS, MAX_VOCAB};
        let head = config::OFFICIAL_HEAD_SIZE;
        if !(1..=MAX_LAYERS).contains(&n_layer)
            || !(1..=MAX_EMBD).contains(&n_embd)
            || !n_embd.is_multiple_of(head)
            || !(1..=MAX_VOCAB).contains(&vocab_size)
        {
            return Err(Error::Shape(format!(
                "Model.random needs n_layer in 1..={MAX_LAYERS}, n_embd a multiple of {head} in {head}..={MAX_EMBD} and vocab_size in 1..={MAX_VOCAB} (got {n_layer}, {n_embd}, {vocab_size})"
            )));
        }
        let ck = random::RandomCheckpoint::new(Config::official(n_layer, n_embd, vocab_size), seed);
        Self::from_checkpoint(Arc::new(ck), options, quant, progress)
    }

    /// Host tables keep reading from `ck` where it maps its file (see host_table.rs).
    /// `progress(done, total)` is called after each tensor; an error from it (an
    /// interrupt) stops the load.
    pub fn from_checkpoint(
        ck: Arc<dyn Checkpoint>,
        options: &DeviceOptions,
        quant: &QuantSpec,
        progress: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Model> {
        let checked = crate::schema::check(ck.as_ref())?;
        let config = checked.config.clone();
        let quant = quant.resolve(config.n_layer)?;
        let ctx = GpuContext::new(options)?;
        let pipelines = Pipelines::new(ctx.clone());
        let weights = Loader::new(&ctx, &pipelines, &quant, &ck, &checked, progress).load()?;
        let pool = StatePool::new(ctx.clone(), &config)?;
        let choice = tuning::device_default(&ctx);
        let model = Model {
            pipelines,
            ctx,
            config,
            weights,
            pool,
            scratch: FairMutex::new(None),
            id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
            last_stats: Mutex::new(CallStats::default()),
            profiling: std::sync::atomic::AtomicBool::new(false),
            counting_reads: std::sync::atomic::AtomicBool::new(false),
            choice: Mutex::new(choice),
            tuning: Mutex::new(tuning::Tuning::default()),
            coop_matrix: std::sync::atomic::AtomicBool::new(false),
            matmul_choice: Mutex::new(coop_check::MatmulChoice::default()),
        };
        model.choose_matmul_kernel()?;
        model.tune()?;
        Ok(model)
    }

    /// Kernel variants compiled so far.
    pub fn pipelines_compiled(&self) -> usize {
        self.pipelines.compiled.load(Ordering::Relaxed)
    }

    /// Tokens one chunk of a call holds at most on this device.
    pub fn chunk_tokens(&self) -> usize {
        scratch::chunk_tokens(self)
    }

    pub fn new_state(&self) -> Result<State> {
        self.pool.allocate(self.id)
    }

    pub(crate) fn check_state(&self, state: &State) -> Result<()> {
        if state.0.model_id != self.id {
            return Err(Error::State("this State belongs to another model".into()));
        }
        Ok(())
    }

    pub(crate) fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Shape("tokens is empty: give at least one token id".into()));
        }
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= self.config.vocab_size) {
            return Err(Error::token_out_of_range(t, Some(i), self.config.vocab_size));
        }
        Ok(())
    }

    /// Feeds `tokens` through the model, advancing `state`; returns the logits asked for
    /// (`Want::Last`: [V], `Want::All`: [T, V], `Want::None`: empty).
    pub fn forward(&self, state: &State, tokens: &[u32], want: Want) -> Result<Vec<f32>> {
        self.forward_batch(&[(state, tokens)], want)
    }

    /// `n` fresh states on one state page (as few as fit), for `forward_batch`.
    pub fn new_states(&self, n: usize) -> Result<Vec<State>> {
        self.pool.allocate_many(self.id, n)
    }

    /// Feeds each state its tokens, advancing them all; sequences whose states share a
    /// page (see `new_states`) run in the same passes over the weights. Returns, in
    /// order, one row per sequence (Last, HiddenLast, Argmax) or one per token (All,
    /// HiddenAll). Everything is checked before anything runs.
    pub fn forward_batch(&self, batch: &[(&State, &[u32])], want: Want) -> Result<Vec<f32>> {
        self.forward_batch_with(batch, want, Interrupt::NONE)
    }

    /// `forward_batch`, asking `interrupt` between submissions. A call of more than one
    /// submission first copies its states aside on the device; if it then fails or is
    /// interrupted, they are copied back, so every state is as it was before the call.
    pub fn forward_batch_with(
        &self,
        batch: &[(&State, &[u32])],
        want: Want,
        interrupt: Interrupt,
    ) -> Result<Vec<f32>> {
        if want == Want::Draw {
            return Err(Error::Invalid("a draw needs its options: use forward_draw_with".into()));
        }
        self.forward_seqs(batch, want, &[], interrupt)
    }

    /// Whether this model draws tokens on the device (`forward_draw_with`): unless the
    /// device options say host (`RWKV_GPU_SAMPLE_ON=host`), wherever a row of logits fits
    /// one storage binding.
    pub fn draws_on_device(&self) -> bool {
        self.ctx.sample_on_device && 4 * self.config.vocab_size as u64 <= self.ctx.max_binding
    }

    /// Whether one call's draws may carry `entries` penalty entries in all (16 bytes each,
    /// in one binding).
    pub fn draw_entries_fit(&self, entries: usize) -> bool {
        (entries as u64).saturating_mul(16) <= self.ctx.max_binding
    }

    /// `forward_batch_with` that draws each sequence's next token on the device with its
    /// `draws` entry (None: that sequence draws nothing; its token is None), reading back
    /// one token per sequence instead of its logits. Needs `draws_on_device`.
    pub fn forward_draw_with(
        &self,
        batch: &[(&State, &[u32])],
        draws: &[Option<&DeviceDraw>],
        interrupt: Interrupt,
    ) -> Result<Vec<Option<u32>>> {
        if !self.draws_on_device() {
            return Err(Error::Invalid(
                "this model draws on the host (RWKV_GPU_SAMPLE_ON=host, or a logits row exceeds one binding)"
                    .into(),
            ));
        }
        if draws.len() != batch.len() {
            return Err(Error::Shape(format!("{} draws for {} sequences", draws.len(), batch.len())));
        }
        let vocab = self.config.vocab_size;
        let mut entries = 0usize;
        for (i, d) in draws.iter().enumerate().filter_map(|(i, d)| d.map(|d| (i, d))) {
            let bad = |what: String| in_batch_item("draw", i, draws.len(), Error::Invalid(what));
            if d.fallback as usize >= vocab || d.entries.iter().any(|e| e.token as usize >= vocab) {
                return Err(bad(format!("a token of the draw is outside the vocabulary of {vocab}")));
            }
            let in_range = (0.0..1.0).contains(&d.u) && d.temperature >= 0.0 && d.temperature.is_finite();
            if !in_range {
                return Err(bad(format!("u {} or temperature {} out of range", d.u, d.temperature)));
            }
            if d.entries.windows(2).any(|w| w[0].token >= w[1].token) {
                return Err(bad("the penalty entries must name each token once, in order".into()));
            }
            entries += d.entries.len();
        }
        if !self.draw_entries_fit(entries) {
            return Err(Error::Invalid(format!("{entries} penalty entries exceed one storage binding")));
        }
        let out = self.forward_seqs(batch, Want::Draw, draws, interrupt)?;
        let none = u32::MAX;
        Ok(out.iter().map(|v| Some(v.to_bits()).filter(|&t| t != none)).collect())
    }

    /// The forward pass behind `forward_batch_with` and `forward_draw_with` (`draws`:
    /// empty, or one per sequence).
    fn forward_seqs(
        &self,
        batch: &[(&State, &[u32])],
        want: Want,
        draws: &[Option<&DeviceDraw>],
        interrupt: Interrupt,
    ) -> Result<Vec<f32>> {
        if batch.is_empty() {
            return Err(Error::Shape("the batch is empty: give at least one (tokens, state) pair".into()));
        }
        for (i, (state, tokens)) in batch.iter().enumerate() {
            self.check_state(state)?;
            self.check_tokens(tokens).map_err(|e| in_batch_item("sequence", i, batch.len(), e))?;
            if let Some(j) = batch[..i]
                .iter()
                .position(|(other, _)| other.0.page == state.0.page && other.0.slot == state.0.slot)
            {
                return Err(Error::State(format!(
                    "sequences {j} and {i} use the same State; give each sequence its own"
                )));
            }
        }
        let _leases = batch.iter().map(|(state, _)| state.lease()).collect::<Result<Vec<_>>>()?;
        let mut scratch = self.scratch()?;
        // Sequences by state page, in order of first appearance.
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, (state, _)) in batch.iter().enumerate() {
            match groups.iter_mut().find(|g| g.0 == state.0.page) {
                Some(g) => g.1.push(i),
                None => groups.push((state.0.page, vec![i])),
            }
        }
        let width = want.width(&self.config);
        let per_token = want.per_token();
        let rows_of = |i: usize| if per_token { batch[i].1.len() } else { 1 };
        let mut out_start = vec![0usize; batch.len()];
        let mut total_rows = 0;
        for (i, start) in out_start.iter_mut().enumerate() {
            *start = total_rows;
            total_rows += rows_of(i);
        }
        let mut out = if groups.len() == 1 {
            Vec::new()
        } else {
            host_memory::zeroed_f32(total_rows.saturating_mul(width), "the output (logits or hidden states)")?
        };
        let mut stats = CallStats::default();
        // A call cut short after a submission (an interrupt, a failure) must not leave its
        // states part way: one that may submit more than once backs them up first.
        let several = groups.len() > 1
            || groups.iter().any(|(_, members)| {
                let lens: Vec<usize> = members.iter().map(|&i| batch[i].1.len()).collect();
                forward::may_submit_more_than_once(&lens, scratch::chunk_tokens(self), interrupt.active())
            });
        let backups = if several {
            let copies = self.new_states(batch.len())?;
            for ((state, _), copy) in batch.iter().zip(&copies) {
                self.copy_slots(state, copy)?;
            }
            Some(copies)
        } else {
            None
        };
        let restore = |e: Error| -> Error {
            if let Some(copies) = &backups {
                for ((state, _), copy) in batch.iter().zip(copies) {
                    if let Err(failed) = self.copy_slots(copy, state) {
                        return failed.after_failed_call(&e);
                    }
                }
            }
            e
        };
        for (page, members) in &groups {
            let page = self.pool.page(*page);
            let seqs: Vec<chunks::SeqInput> = members
                .iter()
                .map(|&i| chunks::SeqInput {
                    slot: batch[i].0 .0.slot as u32,
                    tokens: batch[i].1,
                    draw: draws.get(i).copied().flatten(),
                })
                .collect();
            let (values, group_stats) =
                forward::run(self, &mut scratch, &page, &seqs, want, interrupt).map_err(restore)?;
            stats.merge(group_stats);
            if groups.len() == 1 {
                out = values;
            } else {
                // Scatter this page's sequences' rows into their places.
                let mut at = 0;
                for &i in members {
                    let len = rows_of(i) * width;
                    out[out_start[i] * width..][..len].copy_from_slice(&values[at..at + len]);
                    at += len;
                }
            }
        }
        *self.last_stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
        // New kernel variants compiled by this call (the first, a new chunk shape) go to
        // the on-disk pipeline cache; a steady decode step writes nothing.
        if let Some(cache) = &self.ctx.pipeline_cache {
            cache.persist();
        }
        Ok(out)
    }

    /// Feeds `tokens` and returns the index of the last token's largest logit, found on
    /// the device (lowest index among ties, as numpy.argmax): greedy decoding without
    /// reading the logits back.
    pub fn forward_argmax(&self, state: &State, tokens: &[u32]) -> Result<u32> {
        self.forward_argmax_with(state, tokens, Interrupt::NONE)
    }

    /// `forward_argmax`, asking `interrupt` between submissions (a long prompt).
    pub fn forward_argmax_with(&self, state: &State, tokens: &[u32], interrupt: Interrupt) -> Result<u32> {
        let out = self.forward_batch_with(&[(state, tokens)], Want::Argmax, interrupt)?;
        Ok(out[0].to_bits())
    }

    /// The final normalised hidden state (the head's input) of each token list, each fed
    /// from a fresh state: the last token's, or the mean over all tokens (averaged here on
    /// the host, in f64, as rows are read back). Returns [len(batch), C]. Up to
    /// EMBED_BATCH texts share each pass over the weights.
    pub fn embed(&self, batch: &[Vec<u32>], pooling: Pooling) -> Result<Vec<f32>> {
        self.embed_with(batch, pooling, Interrupt::NONE)
    }

    /// `embed`, asking `interrupt` between submissions.
    ///
    /// Texts are fed one chunk (`chunk_tokens`) at a time each, one forward call per
    /// chunk, so that the model's scratch is let go between chunks: an Engine sharing the
    /// model steps in between, and a long text cannot stall its streams for the whole of
    /// its prefill.
    pub fn embed_with(&self, batch: &[Vec<u32>], pooling: Pooling, interrupt: Interrupt) -> Result<Vec<f32>> {
        for (i, tokens) in batch.iter().enumerate() {
            self.check_tokens(tokens).map_err(|e| in_batch_item("text", i, batch.len(), e))?;
        }
        let c = self.config.n_embd;
        let window = scratch::chunk_tokens(self);
        let mut out = Vec::with_capacity(batch.len() * c);
        for group in batch.chunks(EMBED_BATCH) {
            let states = self.new_states(group.len())?;
            // Per text: the last token's row so far, or the sum of its rows (f64).
            let mut pooled = vec![0f64; group.len() * c];
            let longest = group.iter().map(Vec::len).max().unwrap_or(0);
            for start in (0..longest).step_by(window) {
                let members: Vec<usize> = (0..group.len()).filter(|&i| group[i].len() > start).collect();
                let items: Vec<(&State, &[u32])> = members
                    .iter()
                    .map(|&i| (&states[i], &group[i][start..group[i].len().min(start + window)]))
                    .collect();
                let want = if pooling == Pooling::Last { Want::HiddenLast } else { Want::HiddenAll };
                let rows = self.forward_batch_with(&items, want, interrupt)?;
                let mut at = 0;
                for (&i, (_, tokens)) in members.iter().zip(&items) {
                    let n = if pooling == Pooling::Last { 1 } else { tokens.len() };
                    let sum = &mut pooled[i * c..(i + 1) * c];
                    if pooling == Pooling::Last {
                        sum.fill(0.0);
                    }
                    for row in rows[at * c..(at + n) * c].chunks_exact(c) {
                        sum.iter_mut().zip(row).for_each(|(s, &x)| *s += x as f64);
                    }
                    at += n;
                }
            }
            for (i, tokens) in group.iter().enumerate() {
                let n = if pooling == Pooling::Last { 1.0 } else { tokens.len() as f64 };
                out.extend(pooled[i * c..(i + 1) * c].iter().map(|s| (s / n) as f32));
            }
        }
        Ok(out)
    }

    fn slot_bytes(&self) -> u64 {
        (self.pool.slot_stride * 4) as u64
    }

    /// Copies the state to the host.
    pub fn state_to_host(&self, state: &State) -> Result<HostState> {
        self.check_state(state)?;
        let _lease = state.lease()?;
        let page = self.pool.page(state.0.page);
        let bytes = self.slot_bytes();
        let staging = self.staging(bytes * self.config.n_layer as u64)?;
        let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
        for (l, buffer) in page.layers.iter().enumerate() {
            encoder.copy_buffer_to_buffer(
                buffer,
                state.byte_offset(&self.pool),
                &staging,
                l as u64 * bytes,
                bytes,
            );
        }
        self.ctx.queue.submit([encoder.finish()]);
        let raw = crate::gpu::recorder::read_buffer(&self.ctx, &staging, bytes * self.config.n_layer as u64)?;
        let all: &[f32] = bytemuck::cast_slice(&raw);
        let c = self.config.n_embd;
        let mut host = HostState { att_shift: Vec::new(), wkv: Vec::new(), ffn_shift: Vec::new() };
        for slot in all.chunks_exact(self.pool.slot_stride) {
            host.att_shift.extend_from_slice(&slot[..c]);
            host.ffn_shift.extend_from_slice(&slot[c..2 * c]);
            host.wkv.extend_from_slice(&slot[2 * c..]);
        }
        Ok(host)
    }

    /// A new state holding `host`, checked against this model's dimensions.
    pub fn state_from_host(&self, host: &HostState) -> Result<State> {
        let cfg = &self.config;
        let (l, c) = (cfg.n_layer, cfg.n_embd);
        let wkv_len = l * c * cfg.head_size;
        for (name, got, want) in [
            ("att_shift", host.att_shift.len(), l * c),
            ("ffn_shift", host.ffn_shift.len(), l * c),
            ("wkv", host.wkv.len(), wkv_len),
        ] {
            if got != want {
                return Err(Error::Shape(format!("state {name} has {got} values; this model needs {want}")));
            }
        }
        if [&host.att_shift, &host.ffn_shift, &host.wkv].iter().any(|v| v.iter().any(|x| !x.is_finite())) {
            return Err(Error::Shape("state holds NaN or infinite values".into()));
        }
        let state = self.new_state()?;
        let page = self.pool.page(state.0.page);
        let per = c * cfg.head_size;
        for layer in 0..l {
            let mut slot = Vec::with_capacity(self.pool.slot_stride);
            slot.extend_from_slice(&host.att_shift[layer * c..(layer + 1) * c]);
            slot.extend_from_slice(&host.ffn_shift[layer * c..(layer + 1) * c]);
            slot.extend_from_slice(&host.wkv[layer * per..(layer + 1) * per]);
            self.ctx.queue.write_buffer(
                &page.layers[layer],
                state.byte_offset(&self.pool),
                bytemuck::cast_slice(&slot),
            );
        }
        Ok(state)
    }

    /// A new state with a copy of `state`'s contents, copied on the device.
    pub fn clone_state(&self, state: &State) -> Result<State> {
        self.check_state(state)?;
        let copy = self.new_state()?;
        self.copy_state(state, &copy)?;
        Ok(copy)
    }

    /// Overwrites `dst` with `src`'s contents, on the device.
    pub fn copy_state(&self, src: &State, dst: &State) -> Result<()> {
        self.check_state(src)?;
        self.check_state(dst)?;
        if Arc::ptr_eq(&src.0, &dst.0) {
            return Ok(());
        }
        let _leases = (src.lease()?, dst.lease()?);
        self.copy_slots(src, dst)
    }

    /// The device copy of `copy_state`, for callers that hold the leases.
    fn copy_slots(&self, src: &State, dst: &State) -> Result<()> {
        let (from, to) = (self.pool.page(src.0.page), self.pool.page(dst.0.page));
        // wgpu forbids copying within one buffer, and both slots may share a page: go
        // through a temporary buffer holding every layer's slot.
        let bytes = self.slot_bytes();
        let temp = self.ctx.create_buffer(
            "state copy",
            bytes * self.config.n_layer as u64,
            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
        for l in 0..self.config.n_layer {
            encoder.copy_buffer_to_buffer(
                &from.layers[l],
                src.byte_offset(&self.pool),
                &temp,
                l as u64 * bytes,
                bytes,
            );
        }
        for l in 0..self.config.n_layer {
            encoder.copy_buffer_to_buffer(
                &temp,
                l as u64 * bytes,
                &to.layers[l],
                dst.byte_offset(&self.pool),
                bytes,
            );
        }
        self.ctx.queue.submit([encoder.finish()]);
        Ok(())
    }

    /// The scratch, waited for. A signal handler or callback running inside a call on this
    /// thread (which holds it) is refused rather than left waiting for itself.
    fn scratch(&self) -> Result<FairGuard<'_, Option<Scratch>>> {
        self.scratch.lock().map_err(|_| {
            Error::State(
                "this model is in the middle of a call on this thread: a signal handler or callback cannot \
                 call into it"
                    .into(),
            )
        })
    }

    /// Writes the model as it is held on the device (quantized matrices as codes and
    /// scales) to a safetensors file that `open` loads without quantizing again.
    pub fn save(&self, path: &Path) -> Result<()> {
        saved::save(self, path)
    }

    /// Per layer, what its sparse value projection read while `counting_reads` was on,
    /// since the last call (which zeroes the counters). Layers stored dense count nothing.
    pub fn take_read_counts(&self) -> Result<Vec<ReadCounts>> {
        let scratch = self.scratch()?;
        let Some(buffer) = scratch.as_ref().and_then(|s| s.read_counts.as_ref()) else {
            return Ok(vec![ReadCounts::default(); self.config.n_layer]);
        };
        let raw = self.download(buffer, 0, buffer.size())?;
        self.ctx.queue.write_buffer(buffer, 0, &vec![0u8; raw.len()]);
        let words: &[u32] = bytemuck::cast_slice(&raw);
        Ok(words
            .chunks_exact(4)
            .map(|c| ReadCounts {
                groups_read: c[0] as u64,
                groups: c[1] as u64,
                nonzero_inputs: c[2] as u64,
                inputs: c[3] as u64,
            })
            .collect())
    }

    /// A copy of `size` bytes of a device buffer from `offset`, in host memory.
    pub(crate) fn download(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let staging = self.staging(size)?;
        let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        self.ctx.queue.submit([encoder.finish()]);
        crate::gpu::recorder::read_buffer(&self.ctx, &staging, size)
    }

    fn staging(&self, size: u64) -> Result<wgpu::Buffer> {
        self.ctx.create_buffer("staging", size, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST)
    }

    /// Device bytes by category: layer matrices by format ("weights_fp16" counts bf16
    /// too), the other layer and model vectors ("weights_f32"), the head, the embeddings
    /// (0: they stay in host memory), states and scratch.
    pub fn memory(&self) -> Result<Vec<(&'static str, u64)>> {
        let scratch = self.scratch()?.as_ref().map(|s| s.device_bytes()).unwrap_or(0);
        let mut by_format = [0u64; 3];
        let mut vectors = self.weights.consts.size();
        for layer in &self.weights.layers {
            vectors += layer.consts.size();
            let deep = layer.deep.iter().flat_map(|d| [&d.emb_x, &d.s1]);
            vectors += layer.deep.as_ref().map_or(0, |d| d.consts.size());
            for m in crate::schema::layer_matrices().map(|(_, which)| layer.matrix(which)).chain(deep) {
                by_format[match m.format {
                    WeightFormat::F16 | WeightFormat::Bf16 => 0,
                    WeightFormat::Int8 => 1,
                    WeightFormat::Nf4 => 2,
                }] += m.device_bytes();
            }
        }
        Ok(vec![
            ("weights_fp16", by_format[0]),
            ("weights_int8", by_format[1]),
            ("weights_nf4", by_format[2]),
            ("weights_f32", vectors),
            ("head", self.weights.head.device_bytes()),
            ("embeddings", 0),
            ("states", self.pool.device_bytes()),
            ("scratch", scratch),
        ])
    }

    /// Host bytes of the tables that stay in host memory: the embedding, DeepEmbed's
    /// per-layer tables, and how many of those bytes are read from the checkpoint's
    /// mapping (paged in by the OS as rows are used) rather than copied.
    pub fn host_memory(&self) -> Vec<(&'static str, u64)> {
        let deep: Vec<&host_table::HostTable> =
            self.weights.layers.iter().filter_map(|l| l.deep.as_ref().map(|d| &d.table)).collect();
        let all = std::iter::once(&self.weights.emb).chain(deep.iter().copied());
        vec![
            ("embeddings", self.weights.emb.size_bytes()),
            ("deep_embed", deep.iter().map(|t| t.size_bytes()).sum()),
            ("mapped", all.filter(|t| t.mapped()).map(|t| t.size_bytes()).sum()),
        ]
    }
}

/// A shape error of item `i` of a batch of `len`, saying which ("sequence 2: ...") when
/// there is more than one.
pub fn in_batch_item(what: &str, i: usize, len: usize, error: Error) -> Error {
    match error {
        Error::Shape(m) if len > 1 => Error::Shape(format!("{what} {i}: {m}")),
        e => e,
    }
}
