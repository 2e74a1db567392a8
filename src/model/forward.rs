//! The forward pass plan: for each chunk of tokens, one recorded list of dispatches and
//! one queue submission. Per layer (decode): ln1, token shift (6 mixes), r/k/v, the
//! low-rank paths, the fused WKV kernel, the output projection into the residual, ln2,
//! token shift, ffn key (relu^2) and ffn value into the residual.
//!
//! Sequences are ragged: a chunk holds the tokens of one or more sequences back to back
//! and a table of (first token, tokens, slot) rows; nothing is padded.

use bytemuck::{Pod, Zeroable};

use super::weights::{consts, Chunk, Matrix, WeightFormat};
use super::state::Page;
use super::{CallStats, Model};
use crate::error::Result;
use crate::gpu::recorder::{read_buffer, Binding, Copy, Recorder};
use crate::gpu::{GpuContext, Kernel};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl Want {
    /// One output row per token (else one per sequence, or none).
    pub(crate) fn per_token(self) -> bool {
        matches!(self, Want::All | Want::HiddenAll)
    }

    /// Values in one output row.
    pub(crate) fn width(self, cfg: &super::Config) -> usize {
        match self {
            Want::None => 0,
            Want::Argmax => 1,
            Want::HiddenLast | Want::HiddenAll => cfg.n_embd,
            Want::Last | Want::All => cfg.vocab_size,
        }
    }
}

/// Tokens per chunk at most: enough for matrix-matrix kernels to pay off, small enough
/// that prefill scratch stays a small fraction of the weights.
const MAX_CHUNK: usize = 256;
/// Up to this many tokens, matrices use the matrix-vector kernel, which reads the
/// weights once per 4 tokens: at most four passes, against a 64x64-token tile that
/// would be mostly padding (a batch of decode steps, the tail of a cached prompt).
const MATVEC_TOKENS: usize = 16;
/// Rows of one matvec workgroup (`ROWS` in shaders/matmul.wgsl).
const MATVEC_ROWS: usize = 16;
const MAX_SEQS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct LnParams { c: u32, rows: u32, in_row0: u32, w_off: u32, b_off: u32, eps: f32, out_row0: u32, _pad: u32 }

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ShiftParams { c: u32, t_total: u32, n_seq: u32, mix_off: u32, state_off: u32, slot_stride: u32, _pad: [u32; 2] }

/// One matrix of a matmul dispatch (shaders/matmul.wgsl `Group`).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MatGroup { m: u32, k: u32, w_off: u32, s_off: u32, x_off: u32, y_off: u32, y_stride: u32, flags: u32 }

/// Matrices one matmul dispatch computes at most.
const MAX_GROUPS: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MatParams { t: u32, _pad: [u32; 3], groups: [MatGroup; MAX_GROUPS] }

// MatGroup flags: the activation, and whether to accumulate into y.
const ACT_TANH: u32 = 1;
const ACT_SIGMOID: u32 = 2;
const ACT_RELU_SQ: u32 = 3;
const ADD: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ArgmaxParams { rows: u32, row0: u32, first: u32, out0: u32 }

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct WkvParams {
    c: u32, t_total: u32, n_seq: u32, first_layer: u32, slot_stride: u32, wkv_off: u32,
    w0: u32, a0: u32, v0: u32, k_k: u32, k_a: u32, r_k: u32, lnx_w: u32, lnx_b: u32, eps: f32, _pad: u32,
}

/// Activations for up to `tokens` tokens, allocated once and reused.
///
/// Buffers whose contents are never alive at the same time share memory (each is read
/// only by dispatches recorded before the next write of the other):
/// - `emb`, `xn` and `att`: emb is consumed by ln0 before ln1 first writes xn; xn lives
///   from ln1 (ln2) to the token shift after it, att from wkv7 to the output projection,
///   which fall between them.
/// - `lora` and `ffn`: lora lives from the low-rank second stages to wkv7, ffn from
///   ffn key to ffn value; the next layer's low-rank stages come after.
pub struct Scratch {
    pub tokens: usize,
    emb: wgpu::Buffer,     // (T, C) embedding rows from the host (shares xn's memory)
    x: wgpu::Buffer,       // (T, C) residual stream
    xn: wgpu::Buffer,      // (T, C) normalised
    mix: wgpu::Buffer,     // (6, T, C) token-shifted mixes
    rkv: wgpu::Buffer,     // (3, T, C)
    mid: wgpu::Buffer,     // (T, Dw + Da + Dv + Dg) low-rank hidden
    lora: wgpu::Buffer,    // (4, T, C) low-rank outputs w, a, v, g
    att: wgpu::Buffer,     // (T, C) time-mix output (shares xn's memory)
    v_first: wgpu::Buffer, // (T, C)
    ffn: wgpu::Buffer,     // (T, F) (shares lora's memory)
    seqs: wgpu::Buffer,    // (MAX_SEQS, 4) u32
    best: wgpu::Buffer,    // (2) u32: argmax index and value bits
    /// One logits buffer per head row chunk: (logits_tokens, rows), grown on demand up to
    /// head_tokens, so that calls wanting one token's logits never hold a chunk's worth.
    logits: Vec<wgpu::Buffer>,
    logits_tokens: usize,
    head_tokens: usize,
    staging: Option<wgpu::Buffer>,
    uniform: Option<wgpu::Buffer>,
    bytes: u64,
}

impl Scratch {
    pub fn device_bytes(&self) -> u64 {
        self.bytes + self.staging.as_ref().map(|b| b.size()).unwrap_or(0)
    }
}

/// The largest number of tokens a chunk may hold on this device.
fn chunk_tokens(model: &Model) -> usize {
    let cfg = &model.config;
    let c = cfg.n_embd;
    let widest = (6 * c).max(cfg.ffn_size).max(cfg.lora_w + cfg.lora_a + cfg.lora_v + cfg.lora_g);
    ((model.ctx.max_binding as usize) / (4 * widest)).clamp(1, MAX_CHUNK)
}

fn allocate(model: &Model) -> Result<Scratch> {
    let ctx = &model.ctx;
    let cfg = &model.config;
    let t = chunk_tokens(model);
    let c = cfg.n_embd;
    let dsum = cfg.lora_w + cfg.lora_a + cfg.lora_v + cfg.lora_g;
    let device = &ctx.device;
    let make = |label: &str, floats: usize| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (floats * 4).max(16) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    };
    // Logits: as many tokens at once as the largest head chunk allows in one binding.
    let widest_chunk = model.weights.head.chunks.iter().map(|c| c.rows).max().unwrap_or(1);
    let head_tokens = ((ctx.max_binding as usize) / (4 * widest_chunk)).clamp(1, t);
    ctx.scoped("allocating scratch activations", || {
        let logits: Vec<wgpu::Buffer> = model.weights.head.chunks.iter().map(|c| make("logits", c.rows)).collect();
        let xn = make("emb rows / xn / att", t * c);
        let lora = make("lora / ffn", t * (4 * c).max(cfg.ffn_size));
        let mut s = Scratch {
            tokens: t,
            emb: xn.clone(),
            x: make("x", t * c),
            xn: xn.clone(),
            mix: make("mix", 6 * t * c),
            rkv: make("rkv", 3 * t * c),
            mid: make("lora hidden", t * dsum),
            lora: lora.clone(),
            att: xn,
            v_first: make("v_first", t * c),
            ffn: lora,
            seqs: make("seqs", MAX_SEQS * 4),
            best: make("argmax", 2 * MAX_SEQS),
            logits,
            logits_tokens: 1,
            head_tokens,
            staging: None,
            uniform: None,
            bytes: 0,
        };
        s.bytes = s.activation_bytes();
        s
    })
}

impl Scratch {
    /// Bytes of the distinct buffers (shared ones counted once).
    fn activation_bytes(&self) -> u64 {
        let mut distinct: Vec<&wgpu::Buffer> = Vec::new();
        for b in [&self.emb, &self.x, &self.xn, &self.mix, &self.rkv, &self.mid, &self.lora, &self.att, &self.v_first, &self.ffn, &self.seqs, &self.best] {
            if !distinct.contains(&b) {
                distinct.push(b);
            }
        }
        distinct.iter().map(|b| b.size()).sum::<u64>() + self.logits.iter().map(|b| b.size()).sum::<u64>()
    }

    /// Makes the logits buffers hold `tokens` tokens (at most head_tokens).
    fn ensure_logits(&mut self, model: &Model, tokens: usize) -> Result<()> {
        let tokens = tokens.min(self.head_tokens);
        if tokens <= self.logits_tokens {
            return Ok(());
        }
        let device = &model.ctx.device;
        let logits = model.ctx.scoped("allocating logits", || {
            model.weights.head.chunks.iter().map(|c| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("logits"),
                    size: (tokens * c.rows * 4) as u64,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                })
            }).collect::<Vec<_>>()
        })?;
        self.logits = logits;
        self.logits_tokens = tokens;
        self.bytes = self.activation_bytes();
        Ok(())
    }
}

/// One matrix product y (+)= act(W x) of a dispatch: where it reads x and writes y
/// (offsets in elements of the dispatch's x and y buffers), and its MatGroup flags.
struct Product<'a> {
    w: &'a Matrix,
    x_off: usize,
    y_off: usize,
    y_stride: usize,
    flags: u32,
}

impl Product<'_> {
    /// The kernel's view of one row chunk of this product.
    fn group(&self, chunk: &Chunk) -> MatGroup {
        let (w, rows) = (self.w, chunk.rows);
        MatGroup {
            m: rows as u32,
            k: w.k as u32,
            w_off: chunk.word_off as u32,
            s_off: (chunk.word_off + w.format.scales_offset(rows, w.k)) as u32,
            x_off: self.x_off as u32,
            y_off: (self.y_off + chunk.row0) as u32,
            y_stride: self.y_stride as u32,
            flags: self.flags,
        }
    }
}

/// Records one matmul dispatch over `t` tokens: up to MAX_GROUPS matrices of one weight
/// buffer and format, all reading `x` and writing `y`.
#[allow(clippy::too_many_arguments)]
fn matmul_dispatch(model: &Model, rec: &mut Recorder, weights: &wgpu::Buffer, format: WeightFormat, groups: &[MatGroup],
                   x: &wgpu::Buffer, y: &wgpu::Buffer, t: usize) -> Result<()> {
    let rows = groups.iter().map(|g| g.m as usize).max().unwrap_or(0);
    let (entry, workgroups) = if t <= MATVEC_TOKENS { ("matvec", rows.div_ceil(MATVEC_ROWS)) } else { ("matmul_tiled", rows.div_ceil(64) * t.div_ceil(64)) };
    let pipeline = model.pipelines.get(Kernel::Matmul, entry, format.defines())?;
    let mut params = MatParams { t: t as u32, _pad: [0; 3], groups: [MatGroup::zeroed(); MAX_GROUPS] };
    params.groups[..groups.len()].copy_from_slice(groups);
    let (gx, gy) = model.ctx.grid(workgroups as u32);
    rec.dispatch(&pipeline, &params, vec![Binding::whole(weights), Binding::whole(x), Binding::whole(y)], (gx, gy, groups.len() as u32));
    Ok(())
}

/// Records `products` (all reading `x` and writing `y`): one dispatch when their
/// matrices share a buffer and format (see `Loader::share_buffer`), else one per row chunk.
fn matmuls(model: &Model, rec: &mut Recorder, products: &[Product], x: &wgpu::Buffer, y: &wgpu::Buffer, t: usize) -> Result<()> {
    let first = products[0].w;
    let shared = first.single().filter(|c0| {
        products.len() <= MAX_GROUPS
            && products.iter().all(|p| p.w.format == first.format && p.w.single().is_some_and(|c| c.buffer == c0.buffer))
    });
    if let Some(c0) = shared {
        let groups: Vec<MatGroup> = products.iter().map(|p| p.group(&p.w.chunks[0])).collect();
        return matmul_dispatch(model, rec, &c0.buffer, first.format, &groups, x, y, t);
    }
    for p in products {
        for chunk in &p.w.chunks {
            matmul_dispatch(model, rec, &chunk.buffer, p.w.format, &[p.group(chunk)], x, y, t)?;
        }
    }
    Ok(())
}

/// Records y (+)= act(W x) for one matrix.
#[allow(clippy::too_many_arguments)]
fn matmul(model: &Model, rec: &mut Recorder, w: &Matrix, flags: u32, x: &wgpu::Buffer, x_off: usize,
          y: &wgpu::Buffer, y_off: usize, y_stride: usize, t: usize) -> Result<()> {
    matmuls(model, rec, &[Product { w, x_off, y_off, y_stride, flags }], x, y, t)
}

#[allow(clippy::too_many_arguments)]
fn layer_norm(model: &Model, rec: &mut Recorder, x: &wgpu::Buffer, consts_buf: &wgpu::Buffer, w_slot: usize, b_slot: usize,
              y: &wgpu::Buffer, rows: usize, in_row0: usize, out_row0: usize) -> Result<()> {
    let c = model.config.n_embd;
    let pipeline = model.pipelines.get(Kernel::LayerNorm, "layer_norm", &[])?;
    let params = LnParams { c: c as u32, rows: rows as u32, in_row0: in_row0 as u32, w_off: (w_slot * c) as u32, b_off: (b_slot * c) as u32, eps: 1e-5, out_row0: out_row0 as u32, _pad: 0 };
    let (gx, gy) = model.ctx.grid(rows as u32);
    rec.dispatch(&pipeline, &params, vec![Binding::whole(x), Binding::whole(consts_buf), Binding::whole(y)], (gx, gy, 1));
    Ok(())
}

/// One sequence of a call: its state slot (all sequences of a call share one state
/// page) and the tokens to feed it.
pub struct SeqInput<'a> {
    pub slot: u32,
    pub tokens: &'a [u32],
}

/// One row of a chunk's sequence table: `count` tokens of sequence `seq` at chunk rows
/// `first..first + count`, the sequence's tokens `pos..pos + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeqRow {
    first: usize,
    count: usize,
    seq: usize,
    pos: usize,
}

/// Packs sequences of `lens` tokens into chunks of at most `cap` tokens and `max_rows`
/// sequences, in order: a sequence longer than the room left continues in the next
/// chunk, so every chunk but the last is full (of tokens or of sequences), a sequence
/// appears at most once per chunk and its tokens stay in order.
fn plan_chunks(lens: &[usize], cap: usize, max_rows: usize) -> Vec<Vec<SeqRow>> {
    let mut chunks = Vec::new();
    let mut rows = Vec::new();
    let mut used = 0;
    for (seq, &len) in lens.iter().enumerate() {
        let mut pos = 0;
        while pos < len {
            if used == cap || rows.len() == max_rows {
                chunks.push(std::mem::take(&mut rows));
                used = 0;
            }
            let count = (len - pos).min(cap - used);
            rows.push(SeqRow { first: used, count, seq, pos });
            used += count;
            pos += count;
        }
    }
    if !rows.is_empty() {
        chunks.push(rows);
    }
    chunks
}

/// Feeds each sequence its tokens, all in the same passes over the weights: a chunk
/// holds the tokens of every sequence that fits, back to back. Returns what `want` asks
/// for, sequence by sequence: Last/HiddenLast/Argmax one row each, All/HiddenAll one row
/// per token (sequence 0's tokens first).
pub fn run(model: &Model, scratch: &mut Option<Scratch>, page: &Page, seqs: &[SeqInput], want: Want) -> Result<(Vec<f32>, CallStats)> {
    if scratch.is_none() {
        *scratch = Some(allocate(model)?);
    }
    let s = scratch.as_mut().expect("allocated above");
    let cfg = &model.config;
    let c = cfg.n_embd;
    let ctx: &GpuContext = &model.ctx;
    let mut stats = CallStats::default();

    let lens: Vec<usize> = seqs.iter().map(|q| q.tokens.len()).collect();
    // Where each sequence's output rows start.
    let per_token = want.per_token();
    let mut out_start = Vec::with_capacity(seqs.len());
    let mut out_rows = 0;
    for &len in &lens {
        out_start.push(out_rows);
        out_rows += if per_token { len } else { 1 };
    }
    let mut out = vec![0f32; out_rows * want.width(cfg)];

    for rows in plan_chunks(&lens, s.tokens, MAX_SEQS) {
        let t: usize = rows.iter().map(|r| r.count).sum();
        // Upload: embedding rows (exactly converted to f32) and the sequence table.
        let mut emb = Vec::with_capacity(t * c);
        let esize = model.weights.emb_dtype.size();
        for r in &rows {
            for &tok in &seqs[r.seq].tokens[r.pos..r.pos + r.count] {
                let at = tok as usize * c * esize;
                emb.extend(super::weights::to_f32(&model.weights.emb[at..at + c * esize], model.weights.emb_dtype));
            }
        }
        ctx.queue.write_buffer(&s.emb, 0, bytemuck::cast_slice(&emb));
        let table: Vec<u32> = rows.iter().flat_map(|r| [r.first as u32, r.count as u32, seqs[r.seq].slot, 0]).collect();
        ctx.queue.write_buffer(&s.seqs, 0, bytemuck::cast_slice(&table));

        let mut rec = Recorder::new(ctx);
        rec.profile = model.profiling.load(std::sync::atomic::Ordering::Relaxed);
        record_layers(model, &mut rec, s, &page.layers, t, rows.len())?;
        stats.layer_dispatches += rec.counts.dispatches - 1; // all but ln0

        // The chunk rows whose outputs are wanted, and where each goes in `out`.
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        for r in &rows {
            if per_token {
                wanted.extend((0..r.count).map(|j| (r.first + j, out_start[r.seq] + r.pos + j)));
            } else if want != Want::None && r.pos + r.count == lens[r.seq] {
                wanted.push((r.first + r.count - 1, out_start[r.seq]));
            }
        }
        if wanted.is_empty() {
            stats.add(rec.submit(ctx, &mut s.uniform)?);
            continue;
        }
        let values = match want {
            Want::HiddenLast | Want::HiddenAll => record_hidden(model, &mut rec, s, &wanted)?,
            Want::Argmax => record_argmax(model, &mut rec, s, &wanted)?,
            _ => record_logits(model, &mut rec, s, &wanted)?,
        };
        stats.add(rec.submit(ctx, &mut s.uniform)?);
        let staging = s.staging.clone().expect("the head recording made it");
        let floats = values.iter().map(|p| p.src + p.len).max().unwrap_or(0);
        let raw = read_buffer(ctx, &staging, (floats * 4) as u64)?;
        stats.readbacks += 1;
        let got: &[f32] = bytemuck::cast_slice(&raw);
        for p in values {
            out[p.dst..p.dst + p.len].copy_from_slice(&got[p.src..p.src + p.len]);
        }
    }
    if want == Want::None {
        ctx.wait()?;
    }
    Ok((out, stats))
}

/// `len` values read back from `src` (f32 index in the staging buffer) go to `dst` in
/// the call's output.
struct Placement {
    src: usize,
    dst: usize,
    len: usize,
}

/// Records the final layer norm of the `wanted` chunk rows into consecutive rows of
/// `xn`, starting at `xn` row `out_row0`: one dispatch per run of consecutive rows.
fn final_norm(model: &Model, rec: &mut Recorder, s: &Scratch, wanted: &[(usize, usize)], out_row0: usize) -> Result<()> {
    let mut i = 0;
    while i < wanted.len() {
        let mut n = 1;
        while i + n < wanted.len() && wanted[i + n].0 == wanted[i].0 + n {
            n += 1;
        }
        layer_norm(model, rec, &s.x, &model.weights.consts, consts::LNOUT_W, consts::LNOUT_B, &s.xn, n, wanted[i].0, out_row0 + i)?;
        i += n;
    }
    Ok(())
}

/// The head's final hidden states: the wanted rows' ln_out outputs, read back as they
/// are.
fn record_hidden(model: &Model, rec: &mut Recorder, s: &mut Scratch, wanted: &[(usize, usize)]) -> Result<Vec<Placement>> {
    let c = model.config.n_embd;
    let bytes = (wanted.len() * c * 4) as u64;
    let staging = ensure_staging(model, s, bytes)?;
    final_norm(model, rec, s, wanted, 0)?;
    rec.copy(Copy { src: s.xn.clone(), src_offset: 0, dst: staging, dst_offset: 0, size: bytes });
    Ok(wanted.iter().enumerate().map(|(i, &(_, dst))| Placement { src: i * c, dst: dst * c, len: c }).collect())
}

/// Each wanted row's largest logit, found on the device: the head in groups of rows that
/// fit the logits buffers, each head row chunk folded into a running best per row.
fn record_argmax(model: &Model, rec: &mut Recorder, s: &mut Scratch, wanted: &[(usize, usize)]) -> Result<Vec<Placement>> {
    let bytes = (wanted.len() * 8) as u64;
    let staging = ensure_staging(model, s, bytes)?;
    s.ensure_logits(model, wanted.len())?;
    let head = &model.weights.head;
    let argmax = model.pipelines.get(Kernel::Argmax, "argmax", &[])?;
    final_norm(model, rec, s, wanted, 0)?;
    let mut done = 0;
    while done < wanted.len() {
        let n = (wanted.len() - done).min(s.logits_tokens);
        for (i, chunk) in head.chunks.iter().enumerate() {
            let product = Product { w: head, x_off: done * model.config.n_embd, y_off: 0, y_stride: chunk.rows, flags: 0 };
            let group = MatGroup { y_off: 0, ..product.group(chunk) };
            matmul_dispatch(model, rec, &chunk.buffer, head.format, &[group], &s.xn, &s.logits[i], n)?;
            let params = ArgmaxParams { rows: chunk.rows as u32, row0: chunk.row0 as u32, first: u32::from(i == 0), out0: done as u32 };
            rec.dispatch(&argmax, &params, vec![Binding::whole(&s.logits[i]), Binding::whole(&s.best)], (1, n as u32, 1));
        }
        done += n;
    }
    // `best` holds (index, value bits) per row; the output keeps the index, as f32 bits.
    rec.copy(Copy { src: s.best.clone(), src_offset: 0, dst: staging, dst_offset: 0, size: bytes });
    Ok(wanted.iter().enumerate().map(|(j, &(_, dst))| Placement { src: 2 * j, dst, len: 1 }).collect())
}

/// The wanted rows' logits, in groups of rows that fit the logits buffers; each head row
/// chunk writes its own (n, rows) block, copied to the staging buffer in turn.
fn record_logits(model: &Model, rec: &mut Recorder, s: &mut Scratch, wanted: &[(usize, usize)]) -> Result<Vec<Placement>> {
    let v = model.config.vocab_size;
    let staging = ensure_staging(model, s, (wanted.len() * v * 4) as u64)?;
    s.ensure_logits(model, wanted.len())?;
    let head = &model.weights.head;
    let mut places = Vec::new();
    let mut at = 0;
    let mut done = 0;
    while done < wanted.len() {
        let n = (wanted.len() - done).min(s.logits_tokens);
        let group_rows = &wanted[done..done + n];
        final_norm(model, rec, s, group_rows, 0)?;
        for (i, chunk) in head.chunks.iter().enumerate() {
            let product = Product { w: head, x_off: 0, y_off: 0, y_stride: chunk.rows, flags: 0 };
            let group = MatGroup { y_off: 0, ..product.group(chunk) };
            matmul_dispatch(model, rec, &chunk.buffer, head.format, &[group], &s.xn, &s.logits[i], n)?;
            let bytes = (n * chunk.rows * 4) as u64;
            rec.copy(Copy { src: s.logits[i].clone(), src_offset: 0, dst: staging.clone(), dst_offset: (at * 4) as u64, size: bytes });
            for &(_, dst) in group_rows {
                places.push(Placement { src: at, dst: dst * v + chunk.row0, len: chunk.rows });
                at += chunk.rows;
            }
        }
        done += n;
    }
    Ok(places)
}

/// The read-back buffer, grown to at least `size` bytes.
fn ensure_staging(model: &Model, s: &mut Scratch, size: u64) -> Result<wgpu::Buffer> {
    if s.staging.as_ref().map(|b| b.size() < size).unwrap_or(true) {
        s.staging = Some(model.staging(size)?);
    }
    Ok(s.staging.clone().expect("just ensured"))
}

fn record_layers(model: &Model, rec: &mut Recorder, s: &Scratch, state_layers: &[wgpu::Buffer], t: usize, n_seq: usize) -> Result<()> {
    let cfg = &model.config;
    let c = cfg.n_embd;
    let tc = t * c;
    let stride = model.pool.slot_stride;
    let w = &model.weights;
    let shift6 = model.pipelines.get(Kernel::TokenShift, "token_shift", &["N_MIX=6u"])?;
    let shift1 = model.pipelines.get(Kernel::TokenShift, "token_shift", &["N_MIX=1u"])?;
    let head_size = format!("HEAD_SIZE={}u", cfg.head_size);
    let wkv = model.pipelines.get(Kernel::Wkv7, "wkv7", &[head_size.as_str()])?;
    let shift_groups = c.div_ceil(64) as u32;

    layer_norm(model, rec, &s.emb, &w.consts, consts::LN0_W, consts::LN0_B, &s.x, t, 0, 0)?;
    for (l, layer) in w.layers.iter().enumerate() {
        let state = &state_layers[l];
        // Time mix.
        layer_norm(model, rec, &s.x, &layer.consts, consts::LN1_W, consts::LN1_B, &s.xn, t, 0, 0)?;
        let p = ShiftParams { c: c as u32, t_total: t as u32, n_seq: n_seq as u32, mix_off: (consts::ATT_MIX * c) as u32, state_off: 0, slot_stride: stride as u32, _pad: [0; 2] };
        rec.dispatch(&shift6, &p, vec![Binding::whole(&s.xn), Binding::whole(&layer.consts), Binding::whole(&s.seqs), Binding::whole(state), Binding::whole(&s.mix)], (shift_groups, n_seq as u32, 1));
        // mix rows: 0 r, 1 w, 2 k, 3 v, 4 a, 5 g
        let product = |w, x_row: usize, y_off: usize, y_stride: usize, flags: u32| Product { w, x_off: x_row * tc, y_off, y_stride, flags };
        matmuls(model, rec, &[
            product(&layer.receptance, 0, 0, c, 0),
            product(&layer.key, 2, tc, c, 0),
            product(&layer.value, 3, 2 * tc, c, 0),
        ], &s.mix, &s.rkv, t)?;
        // The low-rank paths: first stages into `mid`, second stages into `lora` rows
        // w, a, v, g. The value-residual path is unused in block 0.
        let (dw, da, dv, dg) = (cfg.lora_w, cfg.lora_a, cfg.lora_v, cfg.lora_g);
        let (mw, ma, mv, mg) = (0, t * dw, t * (dw + da), t * (dw + da + dv));
        let mut first = vec![product(&layer.w1, 1, mw, dw, ACT_TANH), product(&layer.a1, 4, ma, da, 0)];
        let mut second = vec![
            Product { w: &layer.w2, x_off: mw, y_off: 0, y_stride: c, flags: 0 },
            Product { w: &layer.a2, x_off: ma, y_off: tc, y_stride: c, flags: 0 },
        ];
        if l > 0 {
            first.push(product(&layer.v1, 3, mv, dv, 0));
            second.push(Product { w: &layer.v2, x_off: mv, y_off: 2 * tc, y_stride: c, flags: 0 });
        }
        first.push(product(&layer.g1, 5, mg, dg, ACT_SIGMOID));
        second.push(Product { w: &layer.g2, x_off: mg, y_off: 3 * tc, y_stride: c, flags: 0 });
        matmuls(model, rec, &first, &s.mix, &s.mid, t)?;
        matmuls(model, rec, &second, &s.mid, &s.lora, t)?;
        let k = |slot: usize| (slot * c) as u32;
        let p = WkvParams {
            c: c as u32, t_total: t as u32, n_seq: n_seq as u32, first_layer: u32::from(l == 0), slot_stride: stride as u32,
            wkv_off: (2 * c) as u32, w0: k(consts::W0), a0: k(consts::A0), v0: k(consts::V0), k_k: k(consts::K_K),
            k_a: k(consts::K_A), r_k: k(consts::R_K), lnx_w: k(consts::LNX_W), lnx_b: k(consts::LNX_B), eps: 64e-5, _pad: 0,
        };
        rec.dispatch(&wkv, &p, vec![
            Binding::whole(&s.rkv), Binding::whole(&s.lora), Binding::whole(&layer.consts), Binding::whole(&s.seqs),
            Binding::whole(&s.v_first), Binding::whole(state), Binding::whole(&s.att),
        ], (cfg.n_head as u32, n_seq as u32, 1));
        matmul(model, rec, &layer.output, ADD, &s.att, 0, &s.x, 0, c, t)?;
        // Channel mix.
        layer_norm(model, rec, &s.x, &layer.consts, consts::LN2_W, consts::LN2_B, &s.xn, t, 0, 0)?;
        let p = ShiftParams { c: c as u32, t_total: t as u32, n_seq: n_seq as u32, mix_off: (consts::FFN_MIX * c) as u32, state_off: c as u32, slot_stride: stride as u32, _pad: [0; 2] };
        rec.dispatch(&shift1, &p, vec![Binding::whole(&s.xn), Binding::whole(&layer.consts), Binding::whole(&s.seqs), Binding::whole(state), Binding::whole(&s.mix)], (shift_groups, n_seq as u32, 1));
        matmul(model, rec, &layer.ffn_key, ACT_RELU_SQ, &s.mix, 0, &s.ffn, 0, cfg.ffn_size, t)?;
        matmul(model, rec, &layer.ffn_value, ADD, &s.ffn, 0, &s.x, 0, c, t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{plan_chunks, SeqRow};

    #[test]
    fn chunks_are_full_and_sequences_stay_in_order() {
        let lens = [5, 1, 9, 3];
        let chunks = plan_chunks(&lens, 4, 64);
        // 18 tokens in chunks of 4: 4 + 4 + 4 + 4 + 2.
        assert_eq!(chunks.iter().map(|c| c.iter().map(|r| r.count).sum::<usize>()).collect::<Vec<_>>(), [4, 4, 4, 4, 2]);
        assert_eq!(chunks[1], [SeqRow { first: 0, count: 1, seq: 0, pos: 4 }, SeqRow { first: 1, count: 1, seq: 1, pos: 0 }, SeqRow { first: 2, count: 2, seq: 2, pos: 0 }]);
        // Every sequence's tokens appear once, in order, and rows of a chunk tile it.
        let mut next = vec![0; lens.len()];
        for chunk in &chunks {
            let mut at = 0;
            for r in chunk {
                assert_eq!((r.first, r.pos), (at, next[r.seq]));
                at += r.count;
                next[r.seq] += r.count;
            }
        }
        assert_eq!(next, lens);
    }

    #[test]
    fn a_chunk_holds_at_most_max_rows_sequences() {
        let chunks = plan_chunks(&[1; 10], 256, 4);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        assert!(plan_chunks(&[], 256, 4).is_empty());
    }
}
