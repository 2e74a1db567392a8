//! The forward pass: for each chunk of tokens, one program of dispatches (recorded once
//! per chunk shape and kept with the state page it runs on) and one queue submission.
//! The layer functions below follow the RWKV-7 math (the project notes, rwkv7.md) step by step.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::chunks::{plan_chunks, Pace, SeqInput, SeqRow, PACE_MIN};
use super::head::{self, Placement};
use super::host_memory;
use super::ops::{self, Act, DeepEmbed, LayerNorm, LnShift, LoraInput, Product, ReadCounts, Split, Wkv};
use super::scratch::{Scratch, MAX_SEQS};
use super::state::Page;
use super::weights::{consts, Layer};
use super::{CallStats, Model};
use crate::error::{Error, Result};
use crate::gpu::recorder::{read_buffer, Program};
use crate::gpu::{GpuContext, Recorder};
use crate::interrupt::Interrupt;
use crate::sampler::DeviceDraw;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Want {
    None,
    /// The last token's logits.
    Last,
    /// Every token's logits.
    All,
    /// The last token's final normalised hidden state (ln_out output), [C].
    HiddenLast,
    /// Every token's final normalised hidden state, [T, C].
    HiddenAll,
    /// The index of the last token's largest logit, chosen on the device (one value,
    /// the u32 index in f32 bits; see `Model::forward_argmax`).
    Argmax,
    /// A token drawn on the device from the last token's logits with each sequence's own
    /// `DeviceDraw` (the u32 id in f32 bits; see `Model::forward_draw_with`). Not a name
    /// Python passes: it needs the draws.
    Draw,
}

impl Want {
    /// Each output by the name the Python layer passes.
    const NAMES: [(&'static str, Want); 6] = [
        ("last", Want::Last),
        ("all", Want::All),
        ("none", Want::None),
        ("hidden_last", Want::HiddenLast),
        ("hidden_all", Want::HiddenAll),
        ("argmax", Want::Argmax),
    ];

    pub fn parse(name: &str) -> Result<Want> {
        let known = Self::NAMES.iter().find(|(n, _)| *n == name);
        known.map(|&(_, want)| want).ok_or_else(|| {
            Error::Invalid(format!("want must be one of {:?}, got {name:?}", Self::NAMES.map(|(n, _)| n)))
        })
    }

    /// One output row per token (else one per sequence, or none).
    pub(crate) fn per_token(self) -> bool {
        matches!(self, Want::All | Want::HiddenAll)
    }

    /// Values in one output row.
    pub(crate) fn width(self, cfg: &super::Config) -> usize {
        match self {
            Want::None => 0,
            Want::Argmax | Want::Draw => 1,
            Want::HiddenLast | Want::HiddenAll => cfg.n_embd,
            Want::Last | Want::All => cfg.vocab_size,
        }
    }
}

// Rows of the `mix` buffer: the time mix's six token-shifted inputs.
const MIX_R: usize = 0;
const MIX_W: usize = 1;
const MIX_K: usize = 2;
const MIX_V: usize = 3;
const MIX_A: usize = 4;
const MIX_G: usize = 5;

/// What a chunk's program is a function of: its shape, the rows whose outputs are read
/// back (chunk rows) and what of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    tokens: usize,
    n_seq: usize,
    want: Want,
    wanted: Vec<usize>,
    /// Sparse products count the rows they read (`Model::counting_reads`).
    count_reads: bool,
    /// The kernel variants (tuning times several).
    choice: crate::gpu::tuning_cache::Choice,
    /// The prefill products' kernel (the check at load runs both).
    matmul: super::coop_check::MatmulKernel,
}

struct Plan {
    program: Program,
    places: Vec<Placement>,
    read_floats: usize,
    /// Dispatches of the layers alone (ln0 and the head's excluded).
    layer_dispatches: usize,
}

/// Recorded programs of one state page, most recently used last. They bind the page's
/// buffers, so they live and die with it; a change of scratch buffers (`generation`)
/// makes them all stale.
#[derive(Default)]
pub struct Plans {
    generation: u64,
    entries: VecDeque<(PlanKey, Arc<Plan>)>,
}

/// Programs kept per page: decode, a prefill chunk, a tail chunk, with room to spare.
const PLANS_PER_PAGE: usize = 8;

impl Plans {
    fn get(&mut self, key: &PlanKey, generation: u64) -> Option<Arc<Plan>> {
        if self.generation != generation {
            self.entries.clear();
            self.generation = generation;
        }
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        let entry = self.entries.remove(i).expect("found above");
        let plan = entry.1.clone();
        self.entries.push_back(entry);
        Some(plan)
    }

    fn insert(&mut self, key: PlanKey, plan: Arc<Plan>) {
        if self.entries.len() == PLANS_PER_PAGE {
            self.entries.pop_front();
        }
        self.entries.push_back((key, plan));
    }
}

/// Feeds each sequence its tokens, all in the same passes over the weights: a chunk
/// holds the tokens of every sequence that fits, back to back. Returns what `want` asks
/// for, sequence by sequence: Last/HiddenLast/Argmax one row each, All/HiddenAll one row
/// per token (sequence 0's tokens first).
/// Whether `run` over sequences of `lens` tokens, in chunks of `chunk_tokens`, may submit
/// more than once: several chunks, or (while interruptible) one cut into paced pieces.
pub(super) fn may_submit_more_than_once(lens: &[usize], chunk_tokens: usize, interruptible: bool) -> bool {
    plan_chunks(lens, chunk_tokens, MAX_SEQS).len() > 1
        || (interruptible && lens.iter().sum::<usize>() > PACE_MIN)
}

/// `interrupt` is asked before every chunk but the first. While it is active, chunk n is
/// submitted only once chunk n-2 has run (n-1 for slow chunks), so that an interrupt
/// comes within two chunks' time while the GPU still has the next chunk queued behind
/// the running one, and single-sequence chunks are cut to the measured speed (`Pace`:
/// about a second each at most), so that this stays short on slow devices.
pub fn run(
    model: &Model,
    scratch: &mut Option<Scratch>,
    page: &Page,
    seqs: &[SeqInput],
    want: Want,
    interrupt: Interrupt,
) -> Result<(Vec<f32>, CallStats)> {
    if scratch.is_none() {
        *scratch = Some(Scratch::new(model)?);
    }
    let s = scratch.as_mut().expect("allocated above");
    let cfg = &model.config;
    let ctx: &GpuContext = &model.ctx;
    let profile = model.profiling.load(std::sync::atomic::Ordering::Relaxed);
    let count_reads = model.counting_reads.load(std::sync::atomic::Ordering::Relaxed);
    if count_reads {
        s.ensure_read_counts(model)?;
    }
    if model.split_k() > 1 {
        s.ensure_partials(model)?;
    }
    let mut stats = CallStats::default();

    let lens: Vec<usize> = seqs.iter().map(|q| q.tokens.len()).collect();
    // Where each sequence's output rows start.
    let per_token = want.per_token();
    let width = want.width(cfg);
    let mut out_start = Vec::with_capacity(seqs.len());
    let mut out_rows = 0;
    for &len in &lens {
        out_start.push(out_rows);
        out_rows += if per_token { len } else { 1 };
    }
    let mut out =
        host_memory::zeroed_f32(out_rows.saturating_mul(width), "the output (logits or hidden states)")?;

    // Submissions not yet waited for, oldest first, with when each was submitted and its
    // tokens (only while interruptible), and when the last one waited for was seen done.
    let mut in_flight: VecDeque<(wgpu::SubmissionIndex, Instant, usize)> = VecDeque::new();
    let mut last_done: Option<Instant> = None;
    let mut pace = Pace::new(s.tokens, interrupt.active());
    let mut planned: VecDeque<Vec<SeqRow>> = plan_chunks(&lens, s.tokens, MAX_SEQS).into();
    let mut n = 0;
    while let Some(next) = planned.pop_front() {
        if n > 0 {
            if interrupt.active() && in_flight.len() >= pace.depth() {
                let (submission, submitted, tokens) =
                    in_flight.pop_front().expect("at least one is in flight");
                ctx.wait_for(submission)?;
                // The GPU ran it after the one before (or from its submission).
                let now = Instant::now();
                let began = last_done.map_or(submitted, |d| d.max(submitted));
                pace.observe(tokens, (now - began).as_secs_f64());
                last_done = Some(now);
            }
            interrupt.check()?;
        }
        n += 1;
        let (rows, rest) = pace.take(next);
        if let Some(rest) = rest {
            planned.push_front(rest);
        }
        let started = Instant::now();
        let t: usize = rows.iter().map(|r| r.count).sum();
        upload_chunk(model, s, seqs, &rows, t)?;
        // The chunk rows whose outputs are wanted, and the output row each goes to.
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        for r in &rows {
            if per_token {
                wanted.extend((0..r.count).map(|j| (r.first + j, out_start[r.seq] + r.pos + j)));
            } else if want != Want::None && r.pos + r.count == lens[r.seq] {
                wanted.push((r.first + r.count - 1, out_start[r.seq]));
            }
        }
        let chunk_want = if wanted.is_empty() { Want::None } else { want };
        head::prepare(model, s, chunk_want, wanted.len())?;
        if chunk_want == Want::Draw {
            // The wanted rows in order: the last token of each sequence that ends here.
            let ending = rows.iter().filter(|r| r.pos + r.count == lens[r.seq]);
            upload_draws(model, s, ending.map(|r| seqs[r.seq].draw))?;
        }
        let key = PlanKey {
            tokens: t,
            n_seq: rows.len(),
            want: chunk_want,
            wanted: wanted.iter().map(|w| w.0).collect(),
            count_reads,
            choice: model.choice(),
            matmul: model.matmul_kernel(),
        };
        let cached = page.plans.lock().unwrap_or_else(|p| p.into_inner()).get(&key, s.generation);
        let plan = match cached {
            Some(plan) => plan,
            None => {
                let plan = Arc::new(record(model, s, page, &key)?);
                page.plans.lock().unwrap_or_else(|p| p.into_inner()).insert(key, plan.clone());
                plan
            }
        };
        let mut counts = plan.program.submit(ctx, profile)?;
        if let (true, Some(submission)) = (interrupt.active(), counts.submission.take()) {
            in_flight.push_back((submission, started, t));
        }
        stats.layer_dispatches += plan.layer_dispatches;
        stats.add(counts);
        stats.host_ns += started.elapsed().as_nanos() as u64;
        // The next submission of this chunk shape (the next decode step, the next chunk
        // of a long prompt) encoded while the GPU runs this one: off the critical path,
        // and so not host time. Best effort: this call's work is submitted already, and a
        // failure here recurs, and is reported, when the next submission encodes its own.
        if !profile {
            let _ = plan.program.encode_spare(ctx);
        }
        if chunk_want == Want::None {
            continue;
        }
        let raw = read_buffer(ctx, s.staging(), (plan.read_floats * 4) as u64)?;
        stats.readbacks += 1;
        let got: &[f32] = bytemuck::cast_slice(&raw);
        for p in &plan.places {
            let dst = wanted[p.row].1 * width + p.col;
            out[dst..dst + p.len].copy_from_slice(&got[p.src..p.src + p.len]);
        }
    }
    if want == Want::None {
        ctx.wait()?;
    }
    Ok((out, stats))
}

/// Writes the chunk's embedding rows (exactly converted to f32), DeepEmbed's table rows
/// of every layer, and the sequence table.
fn upload_chunk(model: &Model, s: &Scratch, seqs: &[SeqInput], rows: &[SeqRow], t: usize) -> Result<()> {
    let ids = || rows.iter().flat_map(|r| seqs[r.seq].tokens[r.pos..r.pos + r.count].iter().copied());
    let mut values = Vec::with_capacity(t * model.config.n_embd);
    model.weights.emb.rows_into(ids(), &mut values)?;
    model.ctx.queue.write_buffer(&s.emb, 0, bytemuck::cast_slice(&values));
    if model.config.deep_embed() {
        values.clear();
        for layer in &model.weights.layers {
            layer
                .deep
                .as_ref()
                .expect("every layer of a DeepEmbed model")
                .table
                .rows_into(ids(), &mut values)?;
        }
        model.ctx.queue.write_buffer(&s.deep, 0, bytemuck::cast_slice(&values));
    }
    let table: Vec<u32> =
        rows.iter().flat_map(|r| [r.first as u32, r.count as u32, seqs[r.seq].slot, 0]).collect();
    model.ctx.queue.write_buffer(&s.seqs, 0, bytemuck::cast_slice(&table));
    Ok(())
}

/// Writes the draws table (row j: wanted row j's draw) and their penalty entries, making
/// room for the entries first (before the program is looked up: a bigger buffer makes
/// the recorded programs stale).
fn upload_draws<'a>(
    model: &Model,
    s: &mut Scratch,
    draws: impl Iterator<Item = Option<&'a DeviceDraw>>,
) -> Result<()> {
    let mut rows = Vec::with_capacity(MAX_SEQS);
    let mut entries: Vec<[u32; 4]> = Vec::new();
    for draw in draws {
        let Some(d) = draw else {
            rows.push(ops::DrawRow::SKIP);
            continue;
        };
        rows.push(ops::DrawRow {
            u: d.u,
            temperature: d.temperature,
            top_p: d.top_p,
            top_k: d.top_k,
            fallback: d.fallback,
            first_entry: entries.len() as u32,
            entries: d.entries.len() as u32,
            skip: 0,
        });
        entries.extend(d.entries.iter().map(|e| {
            let bias = if e.banned { f32::NEG_INFINITY } else { e.bias };
            [e.token, bias.to_bits(), e.penalty.to_bits(), u32::from(e.banned)]
        }));
    }
    s.ensure_draw_entries(model, entries.len())?;
    model.ctx.queue.write_buffer(&s.draws, 0, bytemuck::cast_slice(&rows));
    if !entries.is_empty() {
        model.ctx.queue.write_buffer(&s.draw_entries, 0, bytemuck::cast_slice(&entries));
    }
    Ok(())
}

/// Records the program of one chunk: ln0, every layer, the head.
fn record(model: &Model, s: &Scratch, page: &Page, key: &PlanKey) -> Result<Plan> {
    let mut rec = Recorder::new(&model.ctx);
    let (t, n_seq) = (key.tokens, key.n_seq);
    ops::layer_norm(
        model,
        &mut rec,
        LayerNorm {
            x: &s.emb,
            in_row0: 0,
            rows: t,
            consts: &model.weights.consts,
            weight: consts::LN0_W,
            bias: consts::LN0_B,
            y: &s.x,
            out_row0: 0,
        },
    )?;
    // DeepEmbed: each layer's table rows (uploaded) plus s_emb_x times the normalised
    // embedding, while x still holds it.
    let width = model.config.deep_embed_width();
    for (l, layer) in model.weights.layers.iter().enumerate() {
        if let Some(deep) = &layer.deep {
            let merge = Product {
                w: &deep.emb_x,
                x_off: 0,
                y_off: l * t * width,
                y_stride: width,
                act: Act::None,
                add: true,
            };
            ops::products(model, &mut rec, &s.x, &s.deep, t, &[merge])?;
        }
    }
    // Decode (every token its sequence's first, few enough for the matrix-vector kernels)
    // may split each value projection but the last along K: the next layer's ln_shift
    // folds the parts into x (ops::Split). The last one's would need the head to fold.
    let split_decode = key.choice.split_k > 1 && t == n_seq && t <= ops::MATVEC_TOKENS;
    let layers = &model.weights.layers;
    let split_of = |l: usize| {
        let splits =
            split_decode && l + 1 < layers.len() && ops::can_split(&layers[l].ffn_value, key.choice.split_k);
        let partials = s.partials.as_ref().filter(|_| splits)?;
        Some(Split { partials, parts: key.choice.split_k })
    };
    for (l, layer) in layers.iter().enumerate() {
        let counts = if key.count_reads { s.read_counts.as_ref() } else { None };
        let chunk = Chunk {
            model,
            s,
            layer,
            index: l,
            state: &page.layers[l],
            first_layer: l == 0,
            tokens: t,
            n_seq,
            counts,
            fold: l.checked_sub(1).and_then(split_of),
            split: split_of(l),
        };
        chunk.time_mix(&mut rec)?;
        chunk.channel_mix(&mut rec)?;
    }
    let layer_dispatches = rec.counts.dispatches - 1;
    let places = head::record(model, &mut rec, s, key.want, &key.wanted)?;
    let read_floats = places.iter().map(|p| p.src + p.len).max().unwrap_or(0);
    Ok(Plan { program: rec.finish(&model.ctx)?, places, read_floats, layer_dispatches })
}

/// One layer over one chunk: what every step of it reads and writes.
struct Chunk<'a> {
    model: &'a Model,
    s: &'a Scratch,
    layer: &'a Layer,
    index: usize,
    state: &'a wgpu::Buffer,
    first_layer: bool,
    tokens: usize,
    n_seq: usize,
    /// Where the sparse value projection counts its reads (profiles): four counters per layer.
    counts: Option<&'a wgpu::Buffer>,
    /// The previous layer's value projection left its parts for this layer to fold into x.
    fold: Option<Split<'a>>,
    /// This layer's value projection is split so (its parts folded by the next layer).
    split: Option<Split<'a>>,
}

impl Chunk<'_> {
    /// The time mix (attention) of rwkv7.md, with the residual added to x.
    fn time_mix(&self, rec: &mut Recorder) -> Result<()> {
        let (model, s, layer, cfg) = (self.model, self.s, self.layer, &self.model.config);
        let (t, c) = (self.tokens, cfg.n_embd);
        let tc = t * c;
        // x -> ln1 -> token shift against the previous token: the six mixes xr .. xg.
        ops::ln_shift(
            model,
            rec,
            LnShift {
                x: &s.x,
                consts: &layer.consts,
                weight: consts::LN1_W,
                bias: consts::LN1_B,
                first_mix: consts::ATT_MIX,
                mixes: 6,
                state: self.state,
                state_off: 0,
                seqs: &s.seqs,
                out: &s.mix,
                tokens: t,
                n_seq: self.n_seq,
                keep_normalised: false,
                fold: self.fold,
            },
        )?;

        // r, k, v and the low-rank first stages (w: tanh, g: sigmoid), one dispatch: r, k,
        // v into proj rows 0-2, the hidden values after them (block 0 has no v path).
        let mix = |row: usize| row * tc;
        let hidden = [
            3 * tc,
            3 * tc + t * cfg.lora_w,
            3 * tc + t * (cfg.lora_w + cfg.lora_a),
            3 * tc + t * (cfg.lora_w + cfg.lora_a + cfg.lora_v),
        ];
        let into = |w, x_off, y_off, y_stride, act| Product { w, x_off, y_off, y_stride, act, add: false };
        let mut first = vec![
            into(&layer.receptance, mix(MIX_R), 0, c, Act::None),
            into(&layer.key, mix(MIX_K), tc, c, Act::None),
            into(&layer.value, mix(MIX_V), 2 * tc, c, Act::None),
            into(&layer.w1, mix(MIX_W), hidden[0], cfg.lora_w, Act::Tanh),
            into(&layer.a1, mix(MIX_A), hidden[1], cfg.lora_a, Act::None),
            into(&layer.g1, mix(MIX_G), hidden[3], cfg.lora_g, Act::Sigmoid),
        ];
        if !self.first_layer {
            first.push(into(&layer.v1, mix(MIX_V), hidden[2], cfg.lora_v, Act::None));
        }
        ops::products(model, rec, &s.mix, &s.proj, t, &first)?;

        // The low-rank second stages: in the WKV kernel for a few tokens, else one
        // product into `lora` rows w, a, v, g.
        let second: [Option<&_>; 4] =
            [Some(&layer.w2), Some(&layer.a2), (!self.first_layer).then_some(&layer.v2), Some(&layer.g2)];
        let present: Vec<&_> = second.iter().flatten().copied().collect();
        let lora = if ops::can_fuse_lora(t, &present, cfg.lora_sum()) {
            let buffer = &layer.w2.chunks[0].buffer;
            LoraInput::Fused { buffer, mid_off: 3 * tc, mid: hidden.map(|h| h - 3 * tc), matrices: second }
        } else {
            let mut products = Vec::new();
            for (i, m) in second.iter().enumerate() {
                if let Some(m) = m {
                    products.push(Product {
                        w: m,
                        x_off: hidden[i],
                        y_off: i * tc,
                        y_stride: c,
                        act: Act::None,
                        add: false,
                    });
                }
            }
            ops::products(model, rec, &s.proj, &s.lora, t, &products)?;
            LoraInput::Computed(&s.lora)
        };

        // The WKV recurrence, GroupNorm, bonus and gate.
        ops::wkv(
            model,
            rec,
            Wkv {
                proj: &s.proj,
                lora,
                consts: &layer.consts,
                seqs: &s.seqs,
                v_first: &s.v_first,
                first_layer: self.first_layer,
                state: self.state,
                wkv_off: 2 * c,
                out: &s.att,
                tokens: t,
                n_seq: self.n_seq,
            },
        )?;
        // The output projection, added to the residual stream.
        ops::products(
            model,
            rec,
            &s.att,
            &s.x,
            t,
            &[Product { w: &layer.output, x_off: 0, y_off: 0, y_stride: c, act: Act::None, add: true }],
        )
    }

    /// The channel mix (feed-forward) of rwkv7.md, with the residual added to x; with
    /// DeepEmbed (RWKV-7a), the key activations scaled per token first.
    fn channel_mix(&self, rec: &mut Recorder) -> Result<()> {
        let (model, s, layer, cfg) = (self.model, self.s, self.layer, &self.model.config);
        let (t, c, f) = (self.tokens, cfg.n_embd, cfg.ffn_size);
        // x -> ln2 -> token shift: one mix (DeepEmbed: and the ln2 output xf after it).
        ops::ln_shift(
            model,
            rec,
            LnShift {
                x: &s.x,
                consts: &layer.consts,
                weight: consts::LN2_W,
                bias: consts::LN2_B,
                first_mix: consts::FFN_MIX,
                mixes: 1,
                state: self.state,
                state_off: c,
                seqs: &s.seqs,
                out: &s.mix,
                tokens: t,
                n_seq: self.n_seq,
                keep_normalised: layer.deep.is_some(),
                fold: None,
            },
        )?;
        // relu(key)^2 (DeepEmbed: and h = xf @ s1, after the activations, same dispatch).
        let mut products = vec![Product {
            w: &layer.ffn_key,
            x_off: 0,
            y_off: 0,
            y_stride: f,
            act: Act::ReluSquared,
            add: false,
        }];
        if let Some(deep) = &layer.deep {
            products.push(Product {
                w: &deep.s1,
                x_off: t * c,
                y_off: t * f,
                y_stride: cfg.deep_embed_rank,
                act: Act::None,
                add: false,
            });
        }
        ops::products(model, rec, &s.mix, &s.ffn, t, &products)?;
        if let Some(deep) = &layer.deep {
            ops::deep_embed(
                model,
                rec,
                DeepEmbed {
                    se: &s.deep,
                    se_off: self.index * t * cfg.deep_embed_width(),
                    consts: &deep.consts,
                    kf: &s.ffn,
                    h_off: t * f,
                    tokens: t,
                },
            )?;
        }
        // The value projection, added to the residual stream. Input-major (the loader's
        // choice where it fits one binding), decode skips the rows of zero activations
        // (and may split it along K, leaving the parts for the next layer to add).
        let value =
            Product { w: &layer.ffn_value, x_off: 0, y_off: 0, y_stride: c, act: Act::None, add: true };
        let counts = self.counts.map(|buffer| ReadCounts { buffer, at: 4 * self.index });
        match self.split {
            Some(split) => ops::split_product(model, rec, &s.ffn, t, &value, split, counts),
            None => ops::counted_products(model, rec, &s.ffn, &s.x, t, &[value], counts),
        }
    }
}
