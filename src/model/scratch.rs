//! Activations for one chunk of up to `tokens` tokens, allocated once per model and
//! reused by every call.

use super::ops::{DrawRow, MATVEC_TOKENS, MAX_SPLIT};
use super::Model;
use crate::error::Result;

/// Sequences per chunk at most (rows of the sequence table).
pub const MAX_SEQS: usize = 64;

/// Penalty entries the draws buffer holds at first (16 bytes each); it doubles as needed.
const FIRST_DRAW_ENTRIES: usize = 1024;

/// Buffers whose contents are never alive at the same time share memory (each is read
/// only by dispatches recorded before the next write of the other):
/// - `emb`, `att` and `norm`: the embedding rows are consumed by ln0 before the first
///   layer; the time-mix output lives from wkv7 to the output projection; the head's
///   normalised rows come after the last layer.
/// - `lora` and `ffn`: lora lives from the low-rank second stages to wkv7, ffn from ffn
///   key to ffn value; the next layer's low-rank stages come after.
pub struct Scratch {
    pub tokens: usize,
    pub emb: wgpu::Buffer,     // (T, C) embedding rows from the host
    pub x: wgpu::Buffer,       // (T, C) residual stream
    pub mix: wgpu::Buffer,     // (6, T, C) token-shifted mixes r, w, k, v, a, g (channel mix: row 0)
    pub proj: wgpu::Buffer,    // (3, T, C) r, k, v, then (T, Dw), (T, Da), (T, Dv), (T, Dg) low-rank hidden
    pub lora: wgpu::Buffer,    // (4, T, C) low-rank outputs w, a, v, g
    pub att: wgpu::Buffer,     // (T, C) time-mix output
    pub v_first: wgpu::Buffer, // (T, C)
    pub ffn: wgpu::Buffer,     // (T, F) key activations; DeepEmbed: then (T, r) h
    pub deep: wgpu::Buffer,    // DeepEmbed: (L, T, r * r) each layer's table rows, completed on the device
    pub norm: wgpu::Buffer,    // (T, C) the head's normalised rows
    /// (MAX_SPLIT, T <= MATVEC_TOKENS, C): a split product's parts (ops::Split), made by
    /// the first call that splits.
    pub partials: Option<wgpu::Buffer>,
    pub seqs: wgpu::Buffer, // (MAX_SEQS, 4) u32: first token, tokens, slot, -
    pub best: wgpu::Buffer, // (MAX_SEQS, 2) u32: argmax index and value bits, or drawn token and 0
    /// (MAX_SEQS) ops::DrawRow: the draws of a chunk's wanted rows (uploaded per chunk).
    pub draws: wgpu::Buffer,
    /// (draw_entries_len, 4) u32: the draws' penalty entries, grown on demand.
    pub draw_entries: wgpu::Buffer,
    pub draw_entries_len: usize,
    /// (draw_rows, V): whole rows of logits gathered from the head's row chunks for the
    /// sampler, made on first use when the head has more than one chunk.
    pub draw_logits: Option<wgpu::Buffer>,
    pub draw_rows: usize,
    /// One logits buffer per head row chunk: (logits_tokens, rows), grown on demand up to
    /// head_tokens, so that calls wanting one token's logits never hold a chunk's worth.
    pub logits: Vec<wgpu::Buffer>,
    pub logits_tokens: usize,
    pub head_tokens: usize,
    pub staging: Option<wgpu::Buffer>,
    /// (L, 4) u32 counters of the rows sparse products read, made when profiles first
    /// ask (`Model::counting_reads`); never replaced, so programs stay valid.
    pub read_counts: Option<wgpu::Buffer>,
    /// Bumped whenever a buffer above is replaced: recorded programs that bind the old
    /// one are stale.
    pub generation: u64,
}

/// The largest number of tokens a chunk may hold on this device: the device's chunk
/// (`GpuContext::chunk_tokens`), fewer where the widest activation would not fit one
/// storage binding.
pub(crate) fn chunk_tokens(model: &Model) -> usize {
    let cfg = &model.config;
    let c = cfg.n_embd;
    let widest = (6 * c)
        .max(cfg.ffn_size + cfg.deep_embed_rank)
        .max(3 * c + cfg.lora_sum())
        .max(cfg.n_layer * cfg.deep_embed_width());
    ((model.ctx.max_binding as usize) / (4 * widest)).clamp(1, model.ctx.chunk_tokens)
}

const USAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::COPY_SRC);

impl Scratch {
    pub fn new(model: &Model) -> Result<Scratch> {
        let ctx = &model.ctx;
        let cfg = &model.config;
        let t = chunk_tokens(model);
        let c = cfg.n_embd;
        let make = |label: &str, floats: usize| ctx.create_buffer(label, (floats * 4).max(16) as u64, USAGE);
        // Logits: as many tokens at once as the largest head chunk allows in one binding.
        let widest_chunk = model.weights.head.chunks.iter().map(|c| c.rows).max().unwrap_or(1);
        let head_tokens = ((ctx.max_binding as usize) / (4 * widest_chunk)).clamp(1, t);
        let logits =
            model.weights.head.chunks.iter().map(|c| make("logits", c.rows)).collect::<Result<Vec<_>>>()?;
        let rows = make("emb rows / att / norm", t * c)?;
        let lora = make("lora / ffn", t * (4 * c).max(cfg.ffn_size + cfg.deep_embed_rank))?;
        let x = make("x", t * c)?;
        Ok(Scratch {
            tokens: t,
            emb: rows.clone(),
            x: x.clone(),
            mix: make("mix", 6 * t * c)?,
            proj: make("r, k, v, lora hidden", t * (3 * c + cfg.lora_sum()))?,
            lora: lora.clone(),
            att: rows.clone(),
            v_first: make("v_first", t * c)?,
            ffn: lora,
            // Never bound in a plain RWKV-7 model: a shared name, no memory.
            deep: if cfg.deep_embed() {
                make("deep embed rows", t * cfg.n_layer * cfg.deep_embed_width())?
            } else {
                x.clone()
            },
            norm: rows,
            partials: None,
            seqs: make("seqs", MAX_SEQS * 4)?,
            best: make("argmax", 2 * MAX_SEQS)?,
            draws: make("draws", MAX_SEQS * std::mem::size_of::<DrawRow>() / 4)?,
            draw_entries: make("draw entries", 4 * FIRST_DRAW_ENTRIES)?,
            draw_entries_len: FIRST_DRAW_ENTRIES,
            draw_logits: None,
            draw_rows: 0,
            logits,
            logits_tokens: 1,
            head_tokens,
            staging: None,
            read_counts: None,
            generation: 0,
        })
    }

    /// Bytes of the distinct buffers (shared ones counted once).
    pub fn device_bytes(&self) -> u64 {
        let mut distinct: Vec<&wgpu::Buffer> = Vec::new();
        let all = [
            &self.emb,
            &self.x,
            &self.mix,
            &self.proj,
            &self.lora,
            &self.att,
            &self.v_first,
            &self.ffn,
            &self.norm,
            &self.deep,
            &self.seqs,
            &self.best,
            &self.draws,
            &self.draw_entries,
        ];
        for b in all
            .into_iter()
            .chain(&self.logits)
            .chain(&self.staging)
            .chain(&self.partials)
            .chain(&self.draw_logits)
        {
            if !distinct.contains(&b) {
                distinct.push(b);
            }
        }
        distinct.iter().map(|b| b.size()).sum()
    }

    /// Makes the logits buffers hold `tokens` tokens (at most head_tokens).
    pub fn ensure_logits(&mut self, model: &Model, tokens: usize) -> Result<()> {
        let tokens = tokens.min(self.head_tokens);
        if tokens <= self.logits_tokens {
            return Ok(());
        }
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        self.logits = model
            .weights
            .head
            .chunks
            .iter()
            .map(|c| model.ctx.create_buffer("logits", (tokens * c.rows * 4) as u64, usage))
            .collect::<Result<_>>()?;
        self.logits_tokens = tokens;
        self.generation += 1;
        Ok(())
    }

    /// Makes the read-back buffer hold at least `size` bytes.
    pub fn ensure_staging(&mut self, model: &Model, size: u64) -> Result<()> {
        if self.staging.as_ref().is_none_or(|b| b.size() < size) {
            self.staging = Some(model.ctx.create_buffer(
                "staging",
                size,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )?);
            self.generation += 1;
        }
        Ok(())
    }

    pub fn ensure_read_counts(&mut self, model: &Model) -> Result<()> {
        if self.read_counts.is_none() {
            let bytes = (16 * model.config.n_layer) as u64;
            let buffer = model.ctx.create_buffer("sparse read counts", bytes, USAGE)?;
            model.ctx.queue.write_buffer(&buffer, 0, &vec![0u8; bytes as usize]);
            self.read_counts = Some(buffer);
        }
        Ok(())
    }

    /// Makes the buffer of split parts (any split, up to MAX_SPLIT parts of decode chunks).
    pub fn ensure_partials(&mut self, model: &Model) -> Result<()> {
        if self.partials.is_none() {
            let bytes = (4 * MAX_SPLIT * MATVEC_TOKENS * model.config.n_embd) as u64;
            self.partials = Some(model.ctx.create_buffer("split partial sums", bytes, USAGE)?);
        }
        Ok(())
    }

    /// Makes the draws' entries buffer hold `entries` entries.
    pub fn ensure_draw_entries(&mut self, model: &Model, entries: usize) -> Result<()> {
        if entries <= self.draw_entries_len {
            return Ok(());
        }
        // Doubling, within one binding (forward_draw_with checks that `entries` fits).
        let most = (model.ctx.max_binding / 16) as usize;
        let len = entries.next_power_of_two().min(most).max(entries);
        self.draw_entries = model.ctx.create_buffer("draw entries", (16 * len) as u64, USAGE)?;
        self.draw_entries_len = len;
        self.generation += 1;
        Ok(())
    }

    /// Makes the gathered logits hold `rows` whole rows (at most as many as one binding
    /// allows; the head then draws in groups).
    pub fn ensure_draw_logits(&mut self, model: &Model, rows: usize) -> Result<()> {
        let row_bytes = 4 * model.config.vocab_size;
        let rows = rows.min((model.ctx.max_binding as usize / row_bytes).max(1)).min(MAX_SEQS);
        if rows <= self.draw_rows {
            return Ok(());
        }
        self.draw_logits = Some(model.ctx.create_buffer("draw logits", (rows * row_bytes) as u64, USAGE)?);
        self.draw_rows = rows;
        self.generation += 1;
        Ok(())
    }

    pub fn staging(&self) -> &wgpu::Buffer {
        self.staging.as_ref().expect("ensure_staging comes first")
    }
}
