//! The forward pass plan: for each chunk of tokens, one recorded list of dispatches and
//! one queue submission. Per layer (decode): ln1, token shift (6 mixes), r/k/v, the
//! low-rank paths, the fused WKV kernel, the output projection into the residual, ln2,
//! token shift, ffn key (relu^2) and ffn value into the residual.
//!
//! Sequences are ragged: a chunk holds the tokens of one or more sequences back to back
//! and a table of (first token, tokens, slot) rows; nothing is padded.

use bytemuck::{Pod, Zeroable};

use super::weights::{consts, Chunk, Matrix, WeightFormat};
use super::{CallStats, Model, State};
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
    fn hidden(self) -> bool {
        matches!(self, Want::HiddenLast | Want::HiddenAll)
    }
}

/// Tokens per chunk at most: enough for matrix-matrix kernels to pay off, small enough
/// that prefill scratch stays a small fraction of the weights.
const MAX_CHUNK: usize = 256;
/// Up to this many tokens, matrices use the matrix-vector kernel.
const MATVEC_TOKENS: usize = 4;
/// Rows of one matvec workgroup (`ROWS` in shaders/matmul.wgsl).
const MATVEC_ROWS: usize = 16;
const MAX_SEQS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct LnParams { c: u32, rows: u32, in_row0: u32, w_off: u32, b_off: u32, eps: f32, _pad: [u32; 2] }

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
struct ArgmaxParams { rows: u32, row0: u32, first: u32, _pad: u32 }

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
            best: make("argmax", 2),
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
              y: &wgpu::Buffer, rows: usize, in_row0: usize) -> Result<()> {
    let c = model.config.n_embd;
    let pipeline = model.pipelines.get(Kernel::LayerNorm, "layer_norm", &[])?;
    let params = LnParams { c: c as u32, rows: rows as u32, in_row0: in_row0 as u32, w_off: (w_slot * c) as u32, b_off: (b_slot * c) as u32, eps: 1e-5, _pad: [0; 2] };
    let (gx, gy) = model.ctx.grid(rows as u32);
    rec.dispatch(&pipeline, &params, vec![Binding::whole(x), Binding::whole(consts_buf), Binding::whole(y)], (gx, gy, 1));
    Ok(())
}

/// Runs `tokens` for one sequence; the plan takes a table of sequences so that batches
/// of several need no new kernels.
pub fn run(model: &Model, scratch: &mut Option<Scratch>, state: &State, tokens: &[u32], want: Want) -> Result<(Vec<f32>, CallStats)> {
    if scratch.is_none() {
        *scratch = Some(allocate(model)?);
    }
    let s = scratch.as_mut().expect("allocated above");
    let cfg = &model.config;
    let (c, v) = (cfg.n_embd, cfg.vocab_size);
    let ctx: &GpuContext = &model.ctx;
    let mut stats = CallStats::default();
    let mut logits = Vec::new();
    let page = model.pool.page(state.0.page);
    let slot = state.0.slot as u32;

    for (chunk_index, chunk) in tokens.chunks(s.tokens).enumerate() {
        let t = chunk.len();
        let last_chunk = (chunk_index + 1) * s.tokens >= tokens.len();
        // Upload: embedding rows (exactly converted to f32) and the sequence table.
        let mut rows = Vec::with_capacity(t * c);
        let esize = model.weights.emb_dtype.size();
        for &tok in chunk {
            let at = tok as usize * c * esize;
            rows.extend(super::weights::to_f32(&model.weights.emb[at..at + c * esize], model.weights.emb_dtype));
        }
        ctx.queue.write_buffer(&s.emb, 0, bytemuck::cast_slice(&rows));
        let seq_table = [0u32, t as u32, slot, 0];
        ctx.queue.write_buffer(&s.seqs, 0, bytemuck::cast_slice(&seq_table));

        let mut rec = Recorder::new(ctx);
        rec.profile = model.profiling.load(std::sync::atomic::Ordering::Relaxed);
        record_layers(model, &mut rec, s, &page.layers, t)?;
        stats.layer_dispatches += rec.counts.dispatches - 1; // all but ln0

        // Head (or final norm): only the rows that are wanted.
        let head_rows: Vec<usize> = match want {
            Want::None => vec![],
            Want::Last | Want::HiddenLast | Want::Argmax if last_chunk => vec![t - 1],
            Want::Last | Want::HiddenLast | Want::Argmax => vec![],
            Want::All | Want::HiddenAll => (0..t).collect(),
        };
        let out_tokens = head_rows.len();
        if out_tokens > 0 && want.hidden() {
            let bytes = (out_tokens * c * 4) as u64;
            let staging = ensure_staging(model, s, bytes)?;
            layer_norm(model, &mut rec, &s.x, &model.weights.consts, consts::LNOUT_W, consts::LNOUT_B, &s.xn, out_tokens, head_rows[0])?;
            rec.copy(Copy { src: s.xn.clone(), src_offset: 0, dst: staging.clone(), dst_offset: 0, size: bytes });
            stats.add(rec.submit(ctx, &mut s.uniform)?);
            let raw = read_buffer(ctx, &staging, bytes)?;
            stats.readbacks += 1;
            logits.extend_from_slice(bytemuck::cast_slice::<u8, f32>(&raw));
        } else if out_tokens > 0 && want == Want::Argmax {
            let staging = ensure_staging(model, s, 8)?;
            layer_norm(model, &mut rec, &s.x, &model.weights.consts, consts::LNOUT_W, consts::LNOUT_B, &s.xn, 1, head_rows[0])?;
            let head = &model.weights.head;
            let argmax = model.pipelines.get(Kernel::Argmax, "argmax", &[])?;
            for (i, chunk) in head.chunks.iter().enumerate() {
                let product = Product { w: head, x_off: 0, y_off: 0, y_stride: chunk.rows, flags: 0 };
                let group = MatGroup { y_off: 0, ..product.group(chunk) };
                matmul_dispatch(model, &mut rec, &chunk.buffer, head.format, &[group], &s.xn, &s.logits[i], 1)?;
                let params = ArgmaxParams { rows: chunk.rows as u32, row0: chunk.row0 as u32, first: u32::from(i == 0), _pad: 0 };
                rec.dispatch(&argmax, &params, vec![Binding::whole(&s.logits[i]), Binding::whole(&s.best)], (1, 1, 1));
            }
            rec.copy(Copy { src: s.best.clone(), src_offset: 0, dst: staging.clone(), dst_offset: 0, size: 8 });
            stats.add(rec.submit(ctx, &mut s.uniform)?);
            let raw = read_buffer(ctx, &staging, 8)?;
            stats.readbacks += 1;
            logits.push(f32::from_bits(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]])));
        } else if out_tokens > 0 {
            let staging_size = (out_tokens * v * 4) as u64;
            let staging = ensure_staging(model, s, staging_size)?;
            s.ensure_logits(model, out_tokens)?;
            let mut done = 0;
            while done < out_tokens {
                let n = (out_tokens - done).min(s.logits_tokens);
                // Consecutive rows: one layer-norm dispatch for the whole group.
                layer_norm(model, &mut rec, &s.x, &model.weights.consts, consts::LNOUT_W, consts::LNOUT_B, &s.xn, n, head_rows[done])?;
                let mut col_off = 0u64;
                let head = &model.weights.head;
                for (i, chunk) in head.chunks.iter().enumerate() {
                    // Each row chunk writes (n, rows) into its own logits buffer.
                    let product = Product { w: head, x_off: 0, y_off: 0, y_stride: chunk.rows, flags: 0 };
                    let group = MatGroup { y_off: 0, ..product.group(chunk) };
                    matmul_dispatch(model, &mut rec, &chunk.buffer, head.format, &[group], &s.xn, &s.logits[i], n)?;
                    let bytes = (n * chunk.rows * 4) as u64;
                    rec.copy(Copy { src: s.logits[i].clone(), src_offset: 0, dst: staging.clone(), dst_offset: (done * v * 4) as u64 + col_off * n as u64, size: bytes });
                    col_off += (chunk.rows * 4) as u64;
                }
                done += n;
            }
            stats.add(rec.submit(ctx, &mut s.uniform)?);
            let raw = read_buffer(ctx, &staging, staging_size)?;
            stats.readbacks += 1;
            let values: &[f32] = bytemuck::cast_slice(&raw);
            // Staging holds, per token group, each head chunk's (n, rows) block in turn.
            let mut out = vec![0f32; out_tokens * v];
            let mut group_start = 0;
            while group_start < out_tokens {
                let n = (out_tokens - group_start).min(s.logits_tokens);
                let mut at = group_start * v;
                for chunk in &model.weights.head.chunks {
                    let (row0, rows) = (chunk.row0, chunk.rows);
                    for j in 0..n {
                        let dst = (group_start + j) * v + row0;
                        out[dst..dst + rows].copy_from_slice(&values[at + j * rows..at + (j + 1) * rows]);
                    }
                    at += n * rows;
                }
                group_start += n;
            }
            logits.extend(out);
        } else {
            stats.add(rec.submit(ctx, &mut s.uniform)?);
        }
    }
    if want == Want::None {
        ctx.wait()?;
    }
    Ok((logits, stats))
}

/// The read-back buffer, grown to at least `size` bytes.
fn ensure_staging(model: &Model, s: &mut Scratch, size: u64) -> Result<wgpu::Buffer> {
    if s.staging.as_ref().map(|b| b.size() < size).unwrap_or(true) {
        s.staging = Some(model.staging(size)?);
    }
    Ok(s.staging.clone().expect("just ensured"))
}

fn record_layers(model: &Model, rec: &mut Recorder, s: &Scratch, state_layers: &[wgpu::Buffer], t: usize) -> Result<()> {
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

    layer_norm(model, rec, &s.emb, &w.consts, consts::LN0_W, consts::LN0_B, &s.x, t, 0)?;
    for (l, layer) in w.layers.iter().enumerate() {
        let state = &state_layers[l];
        // Time mix.
        layer_norm(model, rec, &s.x, &layer.consts, consts::LN1_W, consts::LN1_B, &s.xn, t, 0)?;
        let p = ShiftParams { c: c as u32, t_total: t as u32, n_seq: 1, mix_off: (consts::ATT_MIX * c) as u32, state_off: 0, slot_stride: stride as u32, _pad: [0; 2] };
        rec.dispatch(&shift6, &p, vec![Binding::whole(&s.xn), Binding::whole(&layer.consts), Binding::whole(&s.seqs), Binding::whole(state), Binding::whole(&s.mix)], (shift_groups, 1, 1));
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
            c: c as u32, t_total: t as u32, n_seq: 1, first_layer: u32::from(l == 0), slot_stride: stride as u32,
            wkv_off: (2 * c) as u32, w0: k(consts::W0), a0: k(consts::A0), v0: k(consts::V0), k_k: k(consts::K_K),
            k_a: k(consts::K_A), r_k: k(consts::R_K), lnx_w: k(consts::LNX_W), lnx_b: k(consts::LNX_B), eps: 64e-5, _pad: 0,
        };
        rec.dispatch(&wkv, &p, vec![
            Binding::whole(&s.rkv), Binding::whole(&s.lora), Binding::whole(&layer.consts), Binding::whole(&s.seqs),
            Binding::whole(&s.v_first), Binding::whole(state), Binding::whole(&s.att),
        ], (cfg.n_head as u32, 1, 1));
        matmul(model, rec, &layer.output, ADD, &s.att, 0, &s.x, 0, c, t)?;
        // Channel mix.
        layer_norm(model, rec, &s.x, &layer.consts, consts::LN2_W, consts::LN2_B, &s.xn, t, 0)?;
        let p = ShiftParams { c: c as u32, t_total: t as u32, n_seq: 1, mix_off: (consts::FFN_MIX * c) as u32, state_off: c as u32, slot_stride: stride as u32, _pad: [0; 2] };
        rec.dispatch(&shift1, &p, vec![Binding::whole(&s.xn), Binding::whole(&layer.consts), Binding::whole(&s.seqs), Binding::whole(state), Binding::whole(&s.mix)], (shift_groups, 1, 1));
        matmul(model, rec, &layer.ffn_key, ACT_RELU_SQ, &s.mix, 0, &s.ffn, 0, cfg.ffn_size, t)?;
        matmul(model, rec, &layer.ffn_value, ADD, &s.ffn, 0, &s.x, 0, c, t)?;
    }
    Ok(())
}
