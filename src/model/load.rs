//! Loading weights onto the device in two phases, so that device memory holds the model
//! and little else:
//!
//! 1. plan and allocate: every weight buffer of the model is created, back to back,
//!    before any data moves (sizes follow from the shapes and formats alone);
//! 2. fill: tensor by tensor, read from the checkpoint, converted on the host and written
//!    with `queue.write_buffer`; matrices to quantize go through one reused fp16 input
//!    buffer and the quantize kernel writes their codes in place.
//!
//! Allocating first matters because device allocators carve buffers out of large memory
//! blocks: temporaries (upload staging, fp16 inputs) made between weight buffers leave
//! holes when freed, and a block with one live buffer in it cannot be given back. The
//! temporaries of phase 2 land in blocks of their own, which empty and go.

use std::collections::HashMap;
use std::sync::Arc;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::config::Config;
use super::host_memory;
use super::host_table::HostTable;
use super::saved;
use super::weights::{
    consts, deep_consts, fnv, stored_shape, to_f32_into, Chunk, DeepLayer, Layer, Layout, Matrix,
    WeightFormat, Weights, QUANT_BLOCK,
};
use crate::error::{Error, Result};
use crate::gpu::recorder::{Binding, Recorder};
use crate::gpu::{Codes, GpuContext, Pipelines, Variant};
use crate::loader::Checkpoint;
use crate::model::weights::Quantization;
use crate::schema::{self, Checked, Entry, LayerMatrix, Role, Scope};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QuantizeParams {
    m: u32,
    k: u32,
    s_off: u32,
    dst_off: u32,
}

/// A matrix to allocate: its checkpoint name, shape [m, k], device format and layout.
struct Plan {
    name: String,
    m: usize,
    k: usize,
    format: WeightFormat,
    layout: Layout,
}

impl Plan {
    fn stored(&self) -> (usize, usize) {
        stored_shape(self.m, self.k, self.layout)
    }

    /// Its bytes, rounded up so that the next matrix in a shared buffer starts on a
    /// 16-byte boundary (the matmul kernels read rows as vec4s).
    fn padded_bytes(&self) -> usize {
        let (rows, width) = self.stored();
        (rows * self.format.row_bytes(width)).next_multiple_of(16)
    }
}

pub struct Loader<'a> {
    pub ctx: &'a GpuContext,
    pub pipelines: &'a Pipelines,
    pub quant: &'a Quantization,
    pub ck: &'a dyn Checkpoint,
    /// The same checkpoint, for host tables that keep reading from its mapping.
    pub shared: &'a Arc<dyn Checkpoint>,
    pub config: &'a Config,
    pub checked: &'a Checked,
    pub progress: &'a mut dyn FnMut(usize, usize) -> Result<()>,
    device_bytes: u64,
    fingerprint: u64,
    done: usize,
    total: usize,
    /// fp16 input of the quantize kernel, reused by every quantized row chunk.
    quant_input: Option<wgpu::Buffer>,
    /// Host buffers reused for every tensor (its values as f32; a row chunk's 16-bit
    /// form), so that loading does not leave a trail of freed allocations in the heap.
    values: Vec<f32>,
    upload: Vec<u16>,
}

impl<'a> Loader<'a> {
    pub fn new(
        ctx: &'a GpuContext,
        pipelines: &'a Pipelines,
        quant: &'a Quantization,
        shared: &'a Arc<dyn Checkpoint>,
        checked: &'a Checked,
        progress: &'a mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Self {
        let total = shared.names().len();
        Loader {
            ctx,
            pipelines,
            quant,
            ck: shared.as_ref(),
            shared,
            config: &checked.config,
            checked,
            progress,
            device_bytes: 0,
            fingerprint: 0xcbf2_9ce4_8422_2325,
            done: 0,
            total,
            quant_input: None,
            values: Vec::new(),
            upload: Vec::new(),
        }
    }

    // ---- phase 1: plan and allocate ----

    fn buffer(&mut self, label: &str, size: u64) -> Result<wgpu::Buffer> {
        let size = size.next_multiple_of(4).max(4);
        // COPY_SRC: `Model::save` reads weights back.
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
        let buffer = self.ctx.create_buffer(label, size, usage)?;
        self.device_bytes += size;
        Ok(buffer)
    }

    /// Rows per device buffer for m stored rows k wide: the fp16 form fits one storage
    /// binding. A multiple of 8 when split (an input-major chunk is a run of inputs, which
    /// the kernels read 8 at a time).
    fn rows_per_chunk(&self, m: usize, k: usize) -> usize {
        let max_rows = ((self.ctx.max_binding as usize) / (2 * k)).max(1);
        if max_rows >= m {
            m
        } else {
            (max_rows / 8 * 8).max(1)
        }
    }

    /// The format `name` will be held in: as a saved model holds it, else `want` (None:
    /// fp16). Only the big projections and the head (`quantizable`) may be quantized, and
    /// only when the stored width is a multiple of the quantization block. `sparse`: the
    /// matrix is read by sparse decode, so it is stored input-major where it fits one
    /// binding (and the device options allow), else in the usual layout.
    fn plan(
        &self,
        name: String,
        m: usize,
        k: usize,
        want: Option<WeightFormat>,
        quantizable: bool,
        sparse: bool,
    ) -> Result<Plan> {
        let path = self.ck.path();
        let layout = match saved::stored_layout(self.ck, &name)? {
            Some(layout) => layout,
            None if sparse && self.ctx.sparse_ffn && self.rows_per_chunk(k, m) >= k => Layout::InputMajor,
            None => Layout::OutputMajor,
        };
        let width = stored_shape(m, k, layout).1;
        let format = match saved::stored_format(self.ck, &name)? {
            Some(stored) if !quantizable => {
                return Err(Error::load(
                    path,
                    format!(
                        "{name} is saved as {}, but only the big projections and the head are ever quantized",
                        stored.name()
                    ),
                ));
            }
            Some(stored) if want.is_some_and(|w| w != stored) => {
                return Err(Error::load(path, format!(
                    "{name} is saved as {}; it cannot be loaded as {} (quantizing quantized weights again compounds the error): load it without a dtype, or load the original checkpoint",
                    stored.name(), want.map(|w| w.name()).unwrap_or("?"))));
            }
            Some(stored) => stored,
            None => match want.unwrap_or(WeightFormat::F16) {
                f if f.quantized() && !width.is_multiple_of(QUANT_BLOCK) => WeightFormat::F16,
                f => f,
            },
        };
        Ok(Plan { name, m, k, format, layout })
    }

    /// Whether `plans` fit one buffer: each is one chunk and the whole fits a binding.
    fn fit_one_buffer(&self, plans: &[Plan]) -> bool {
        let total: usize = plans.iter().map(Plan::padded_bytes).sum();
        plans.iter().all(|p| {
            let (rows, width) = p.stored();
            self.rows_per_chunk(rows, width) >= rows
        }) && total as u64 <= self.ctx.max_binding
    }

    /// Allocates the matrices of `plans`: in one buffer, one after another, when they fit
    /// one (a matmul dispatch then computes those of one format together), else a buffer
    /// per row chunk.
    fn allocate(&mut self, label: &str, plans: &[Plan]) -> Result<Vec<Matrix>> {
        if plans.len() > 1 && self.fit_one_buffer(plans) {
            let total: usize = plans.iter().map(Plan::padded_bytes).sum();
            let buffer = self.buffer(label, total as u64)?;
            let mut word = 0;
            return Ok(plans
                .iter()
                .map(|p| {
                    let chunk = Chunk { buffer: buffer.clone(), word_off: word, row0: 0, rows: p.stored().0 };
                    word += p.padded_bytes() / 4;
                    Matrix { m: p.m, k: p.k, format: p.format, layout: p.layout, chunks: vec![chunk] }
                })
                .collect());
        }
        plans.iter().map(|p| self.allocate_one(p.m, p.k, p.format, p.layout, &p.name)).collect()
    }

    /// A matrix in buffers of its own, split by stored rows where it exceeds a binding.
    fn allocate_one(
        &mut self,
        m: usize,
        k: usize,
        format: WeightFormat,
        layout: Layout,
        name: &str,
    ) -> Result<Matrix> {
        let (stored_rows, width) = stored_shape(m, k, layout);
        let per = self.rows_per_chunk(stored_rows, width);
        let mut chunks = Vec::new();
        for row0 in (0..stored_rows).step_by(per) {
            let rows = per.min(stored_rows - row0);
            chunks.push(Chunk {
                buffer: self.buffer(name, (rows * format.row_bytes(width)) as u64)?,
                word_off: 0,
                row0,
                rows,
            });
        }
        Ok(Matrix { m, k, format, layout, chunks })
    }

    // ---- phase 2: fill ----

    /// The tensor's values as f32, in the reused `values` buffer (give it back after use).
    /// A layer-0 tensor the file leaves out (`Checked::absent`) reads as zeros. Fails on a
    /// NaN or infinite value, naming the first.
    fn tensor(&mut self, name: &str, expect: &[usize]) -> Result<Vec<f32>> {
        let numel: usize = expect.iter().product();
        let mut values = std::mem::take(&mut self.values);
        values.clear();
        host_memory::reserve_f32(&mut values, numel, name)?;
        if self.checked.absent.contains(name) {
            values.resize(numel, 0.0);
            return Ok(values);
        }
        let info = self
            .ck
            .info(name)
            .ok_or_else(|| Error::load(self.ck.path(), format!("missing tensor {name:?}")))?;
        if info.numel() != numel {
            return Err(Error::load(
                self.ck.path(),
                format!("tensor {name:?} has shape {:?}; expected {expect:?}", info.shape),
            ));
        }
        let bytes = self.ck.read(name)?;
        if bytes.len() != numel * info.dtype.size() {
            return Err(Error::load(
                self.ck.path(),
                format!(
                    "tensor {name:?} holds {} bytes; expected {}",
                    bytes.len(),
                    numel * info.dtype.size()
                ),
            ));
        }
        self.fingerprint = fnv(fnv(self.fingerprint, name.as_bytes()), &bytes[..bytes.len().min(256)]);
        self.fingerprint = fnv(self.fingerprint, &bytes[bytes.len().saturating_sub(256)..]);
        self.done += 1;
        (self.progress)(self.done, self.total)?;
        to_f32_into(&bytes, info.dtype, &mut values);
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(non_finite(self.ck, name, &info.shape, at, values[at]));
        }
        Ok(values)
    }

    /// Sends the writes queued so far and waits for them, so that their staging memory
    /// is freed before the next tensor's is made.
    fn flush(&self) -> Result<()> {
        self.ctx.queue.submit([]);
        self.ctx.wait()
    }

    fn fill_consts(&mut self, buffer: &wgpu::Buffer, parts: &[(String, usize)]) -> Result<()> {
        let c = self.config.n_embd;
        let mut all = vec![0f32; (buffer.size() as usize) / 4];
        for (name, slot) in parts {
            let slot = *slot;
            let v = self.tensor(name, &[c])?;
            all[slot * c..(slot + 1) * c].copy_from_slice(&v);
            self.values = v;
        }
        self.ctx.queue.write_buffer(buffer, 0, bytemuck::cast_slice(&all));
        Ok(())
    }

    /// Fills `matrix` from the checkpoint tensor `name`: [m, k], or [k, m] when
    /// `file_input_major` (an official low-rank matrix), transposed where the device
    /// layout differs. A matrix with values beyond the fp16 range is kept as bf16: when
    /// it was planned quantized, it moves to buffers of its own.
    fn fill(&mut self, name: &str, matrix: &mut Matrix, file_input_major: bool) -> Result<()> {
        let (m, k) = (matrix.m, matrix.k);
        if saved::stored_format(self.ck, name)?.is_some() {
            return self.fill_saved(name, matrix);
        }
        let values = self.tensor(name, &[m, k])?;
        // Row r of the stored [rows, width] matrix is a row of the file's (`direct`) or a
        // column of it.
        let (rows, width) = matrix.stored();
        let direct = file_input_major == (matrix.layout == Layout::InputMajor);
        // In blocks without a branch per value, so that the compiler vectorizes the test.
        let bf16_needed =
            values.chunks(4096).any(|b| b.iter().fold(false, |any, v| any | (v.abs() > 65504.0)));
        if bf16_needed && matrix.format.quantized() {
            *matrix = self.allocate_one(m, k, WeightFormat::Bf16, matrix.layout, name)?;
        } else if bf16_needed {
            matrix.format = WeightFormat::Bf16;
        }
        let mut bits = std::mem::take(&mut self.upload);
        for chunk in &matrix.chunks {
            bits.clear();
            bits.resize(chunk.rows * width, 0);
            if direct {
                // A row at a time, converted as a slice.
                for (i, out) in bits.chunks_exact_mut(width).enumerate() {
                    let row = &values[(chunk.row0 + i) * width..][..width];
                    to_16_bits(row, out, bf16_needed);
                }
            } else {
                // Stored row r is the file's column r. In tiles of 64 x 64, through a
                // small buffer: each read runs 64 values along a file row (converted as a
                // slice), each write 64 values along a stored row (a value at a time down
                // a column went to memory for nearly every value).
                const TILE: usize = 64;
                let mut run = [0u16; TILE];
                let mut tile = [[0u16; TILE]; TILE]; // [stored row][stored column] in the tile
                for r0 in (0..chunk.rows).step_by(TILE) {
                    let tile_r = (chunk.rows - r0).min(TILE);
                    for c0 in (0..width).step_by(TILE) {
                        let tile_c = (width - c0).min(TILE);
                        for dc in 0..tile_c {
                            let src = &values[(c0 + dc) * rows + chunk.row0 + r0..][..tile_r];
                            to_16_bits(src, &mut run[..tile_r], bf16_needed);
                            for (dr, &b) in run[..tile_r].iter().enumerate() {
                                tile[dr][dc] = b;
                            }
                        }
                        for (dr, row) in tile[..tile_r].iter().enumerate() {
                            bits[(r0 + dr) * width + c0..][..tile_c].copy_from_slice(&row[..tile_c]);
                        }
                    }
                }
            }
            let bytes: &[u8] = bytemuck::cast_slice(&bits);
            if matrix.format.quantized() {
                self.quantize(name, bytes, chunk, width, matrix.format)?;
            } else {
                self.ctx.queue.write_buffer(&chunk.buffer, (chunk.word_off * 4) as u64, bytes);
            }
        }
        self.upload = bits;
        self.values = values;
        self.flush()
    }

    /// Quantizes one row chunk of fp16 pairs into `chunk`, on the device.
    fn quantize(
        &mut self,
        name: &str,
        fp16: &[u8],
        chunk: &Chunk,
        k: usize,
        format: WeightFormat,
    ) -> Result<()> {
        if self.quant_input.as_ref().is_none_or(|b| b.size() < fp16.len() as u64) {
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
            self.quant_input =
                Some(self.ctx.create_buffer("quantization input", fp16.len() as u64, usage)?);
        }
        let input = self.quant_input.clone().expect("just ensured");
        self.ctx.queue.write_buffer(&input, 0, fp16);
        let codes = if format == WeightFormat::Int8 { Codes::Int8 } else { Codes::Nf4 };
        let pipeline = self.pipelines.get(Variant::Quantize { codes })?;
        let rows = chunk.rows;
        let params = QuantizeParams {
            m: rows as u32,
            k: k as u32,
            s_off: (chunk.word_off + format.scales_offset(rows, k)) as u32,
            dst_off: chunk.word_off as u32,
        };
        let invocations = rows * k.div_ceil(2 * QUANT_BLOCK);
        let mut rec = Recorder::new(self.ctx);
        let (gx, gy) = self.ctx.grid(invocations.div_ceil(64) as u32);
        rec.dispatch(
            &pipeline,
            &params,
            vec![Binding::whole(&input), Binding::whole(&chunk.buffer)],
            (gx, gy, 1),
        );
        rec.submit(self.ctx).map_err(|e| match e {
            Error::Device(msg) => Error::Device(format!("quantizing {name}: {msg}")),
            other => other,
        })?;
        Ok(())
    }

    /// Fills a matrix that a saved model holds as codes and scales, in the device layout
    /// of its format (codes, then the scales as f16 pairs), one row chunk at a time. The
    /// file holds it as stored ([m, k] rows and width, here).
    fn fill_saved(&mut self, name: &str, matrix: &Matrix) -> Result<()> {
        let ((m, k), format) = (matrix.stored(), matrix.format);
        let (codes, scales) = saved::read_quantized(self.ck, name, format, m, k)?;
        let scale_values = super::weights::to_f32(&scales, crate::loader::DType::F16);
        if let Some(at) = scale_values.iter().position(|v| !v.is_finite()) {
            return Err(non_finite(
                self.ck,
                &format!("{name}.scales"),
                &[m, k / QUANT_BLOCK],
                at,
                scale_values[at],
            ));
        }
        self.fingerprint = fnv(fnv(self.fingerprint, name.as_bytes()), &codes[..codes.len().min(256)]);
        self.done += 2;
        (self.progress)(self.done, self.total)?;
        let code_bytes = format.code_words(k) * 4;
        let blocks = k / QUANT_BLOCK;
        let scale_words = blocks.div_ceil(2);
        for chunk in &matrix.chunks {
            let (r0, rows) = (chunk.row0, chunk.rows);
            let mut bytes = Vec::with_capacity(rows * format.row_bytes(k));
            bytes.extend_from_slice(&codes[r0 * code_bytes..(r0 + rows) * code_bytes]);
            for r in r0..r0 + rows {
                let row = &scales[r * blocks * 2..(r + 1) * blocks * 2];
                bytes.extend_from_slice(row);
                bytes.resize(bytes.len() + (scale_words * 4 - row.len()), 0); // an odd block count leaves a half word
            }
            self.ctx.queue.write_buffer(&chunk.buffer, (chunk.word_off * 4) as u64, &bytes);
        }
        self.flush()
    }

    /// The device shape [m, k] = [out, in] of a layer matrix.
    fn device_shape(&self, entry: &Entry, which: LayerMatrix) -> (usize, usize) {
        let s = entry.shape_for(self.config);
        if which.low_rank() {
            (s[1], s[0])
        } else {
            (s[0], s[1])
        }
    }

    pub fn load(mut self) -> Result<Weights> {
        let cfg = self.config.clone();
        let (c, v) = (cfg.n_embd, cfg.vocab_size);

        // Phase 1: every buffer, before any data.
        let model_consts = self.buffer("model consts", (consts::MODEL_COUNT * c * 4) as u64)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let q = self.quant.layers.get(i).copied().flatten();
            let layer_consts = self.buffer(&format!("blocks.{i}.consts"), (consts::COUNT * c * 4) as u64)?;
            let mut slots: Vec<(Slot, Plan)> = Vec::new();
            for &which in &ALLOCATION_ORDER {
                let (entry, _) = schema::layer_matrices()
                    .find(|(_, m)| *m == which)
                    .expect("every matrix is in the schema");
                let (m, k) = self.device_shape(entry, which);
                let want = if which.quantizable() { q } else { Some(WeightFormat::F16) };
                let sparse = which == LayerMatrix::FfnValue;
                slots.push((
                    Slot::Base(which),
                    self.plan(entry.name_in(i), m, k, want, which.quantizable(), sparse)?,
                ));
                // DeepEmbed's s1 reads the same chunk rows as the ffn key: beside it, one dispatch.
                if which == LayerMatrix::FfnKey && cfg.deep_embed() {
                    let r = cfg.deep_embed_rank;
                    slots.push((
                        Slot::S1,
                        self.plan(format!("blocks.{i}.ffn.s1"), r, c, Some(WeightFormat::F16), false, false)?,
                    ));
                }
            }
            if cfg.deep_embed() {
                let name = format!("blocks.{i}.ffn.s_emb_x.weight");
                slots.push((
                    Slot::EmbX,
                    self.plan(name, cfg.deep_embed_width(), c, Some(WeightFormat::F16), false, false)?,
                ));
            }
            let (labels, plans): (Vec<Slot>, Vec<Plan>) = slots.into_iter().unzip();
            // Matrices the forward pass runs together (r/k/v; the low-rank first stages;
            // the second stages) must share a buffer to run as one dispatch: best, the
            // whole layer is one buffer (an allocation of exactly its size, no allocator
            // block shared with anything else).
            let matrices = if self.fit_one_buffer(&plans) {
                self.allocate(&format!("blocks.{i}.weights"), &plans)?
            } else {
                let mut parts = self.allocate(&format!("blocks.{i}.att.rkv"), &plans[..3])?;
                if self.fit_one_buffer(&plans[3..11]) {
                    parts.extend(self.allocate(&format!("blocks.{i}.att.lora"), &plans[3..11])?);
                } else {
                    parts.extend(self.allocate(&format!("blocks.{i}.att.lora1"), &plans[3..7])?);
                    parts.extend(self.allocate(&format!("blocks.{i}.att.lora2"), &plans[7..11])?);
                }
                for p in &plans[11..] {
                    parts.push(self.allocate_one(p.m, p.k, p.format, p.layout, &p.name)?);
                }
                parts
            };
            let mut by_slot: HashMap<Slot, Matrix> = labels.into_iter().zip(matrices).collect();
            let mut take = |slot: Slot| by_slot.remove(&slot).expect("allocated above");
            use LayerMatrix::*;
            let deep = if cfg.deep_embed() {
                let f = cfg.ffn_size;
                let consts = self.buffer(
                    &format!("blocks.{i}.ffn.deep consts"),
                    (deep_consts::len(f, cfg.deep_embed_rank) * 4) as u64,
                )?;
                // The table is checked and attached in phase 2; it takes no device memory.
                Some((take(Slot::EmbX), take(Slot::S1), consts))
            } else {
                None
            };
            layers.push((
                Layer {
                    consts: layer_consts,
                    receptance: take(Slot::Base(Receptance)),
                    key: take(Slot::Base(Key)),
                    value: take(Slot::Base(Value)),
                    output: take(Slot::Base(Output)),
                    w1: take(Slot::Base(W1)),
                    w2: take(Slot::Base(W2)),
                    a1: take(Slot::Base(A1)),
                    a2: take(Slot::Base(A2)),
                    v1: take(Slot::Base(V1)),
                    v2: take(Slot::Base(V2)),
                    g1: take(Slot::Base(G1)),
                    g2: take(Slot::Base(G2)),
                    ffn_key: take(Slot::Base(FfnKey)),
                    ffn_value: take(Slot::Base(FfnValue)),
                    deep: None,
                },
                deep,
            ));
        }
        let head_plan = self.plan("head.weight".into(), v, c, self.quant.head, true, false)?;
        let mut head = self.allocate_one(v, c, head_plan.format, head_plan.layout, "head.weight")?;

        // Phase 2: fill, tensor by tensor, in the schema's order.
        let vectors = |scope: Scope, layer: usize| -> Vec<(String, usize)> {
            schema::ENTRIES
                .iter()
                .filter(|e| e.scope == scope)
                .filter_map(|e| match e.role {
                    Role::Vector(slot) => Some((e.name_in(layer), slot)),
                    _ => None,
                })
                .collect()
        };
        self.fill_consts(&model_consts, &vectors(Scope::Model, 0))?;
        let mut filled = Vec::with_capacity(layers.len());
        for (i, (mut layer, deep)) in layers.into_iter().enumerate() {
            self.fill_consts(&layer.consts, &vectors(Scope::Layer, i))?;
            for (entry, which) in schema::layer_matrices() {
                let file_input_major = which.low_rank() && !self.checked.low_rank_out_in;
                self.fill(&entry.name_in(i), layer.matrix_mut(which), file_input_major)?;
            }
            if let Some((mut emb_x, mut s1, consts)) = deep {
                self.fill(&format!("blocks.{i}.ffn.s_emb_x.weight"), &mut emb_x, false)?;
                self.fill(&format!("blocks.{i}.ffn.s1"), &mut s1, true)?;
                self.fill_deep_consts(i, &consts)?;
                let table = self.table(&format!("blocks.{i}.ffn.s_emb.weight"), cfg.deep_embed_width())?;
                layer.deep = Some(DeepLayer { emb_x, s1, consts, table });
            }
            filled.push(layer);
        }
        let layers = filled;
        self.fill("head.weight", &mut head, false)?;
        self.quant_input = None;
        self.values = Vec::new();
        self.upload = Vec::new();

        let emb = self.table("emb.weight", c)?;
        // A saved model keeps the fingerprint of the checkpoint it was made from, so states
        // saved with either load into both.
        let fingerprint = saved::original_fingerprint(self.ck).unwrap_or(self.fingerprint);
        // Buffers a matrix left for bf16 (rare) are counted as the memory report counts.
        Ok(Weights { consts: model_consts, layers, head, emb, device_bytes: self.device_bytes, fingerprint })
    }

    /// A host table [V, width] (checked finite), counted in the progress and fingerprint.
    fn table(&mut self, name: &str, width: usize) -> Result<HostTable> {
        let table = HostTable::load(self.shared, name, self.config.vocab_size, width)?;
        let bytes = table.bytes()?;
        self.fingerprint = fnv(fnv(self.fingerprint, name.as_bytes()), &bytes[..bytes.len().min(256)]);
        drop(bytes);
        self.done += 1;
        (self.progress)(self.done, self.total)?;
        Ok(table)
    }

    /// A DeepEmbed layer's s0 [F] and s2 [r, F] (stored transposed, [F, r]) as f32.
    fn fill_deep_consts(&mut self, layer: usize, buffer: &wgpu::Buffer) -> Result<()> {
        let (f, r) = (self.config.ffn_size, self.config.deep_embed_rank);
        let mut all = vec![0f32; deep_consts::len(f, r)];
        let s0 = self.tensor(&format!("blocks.{layer}.ffn.s0"), &[f])?;
        all[deep_consts::S0..deep_consts::S0 + f].copy_from_slice(&s0);
        self.values = s0;
        let s2 = self.tensor(&format!("blocks.{layer}.ffn.s2"), &[r, f])?;
        let at = deep_consts::s2(f);
        for row in 0..f {
            for j in 0..r {
                all[at + row * r + j] = s2[j * f + row];
            }
        }
        self.values = s2;
        self.ctx.queue.write_buffer(buffer, 0, bytemuck::cast_slice(&all));
        Ok(())
    }
}

/// Where an allocated matrix goes in its layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Slot {
    Base(LayerMatrix),
    S1,
    EmbX,
}

/// The order of a layer's matrices in its device buffer: as the forward pass reads them,
/// so that those one dispatch computes together lie side by side.
const ALLOCATION_ORDER: [LayerMatrix; 14] = {
    use LayerMatrix::*;
    [Receptance, Key, Value, W1, A1, V1, G1, W2, A2, V2, G2, Output, FfnKey, FfnValue]
};

/// Writes `values` into `out` as the bits of bf16 (`as_bf16`) or fp16 values, as one
/// slice: half converts fp16 slices with vector instructions where the CPU has them
/// (F16C on x86).
fn to_16_bits(values: &[f32], out: &mut [u16], as_bf16: bool) {
    if as_bf16 {
        bytemuck::cast_slice_mut::<u16, bf16>(out).convert_from_f32_slice(values);
    } else {
        bytemuck::cast_slice_mut::<u16, f16>(out).convert_from_f32_slice(values);
    }
}

/// The error for a NaN or infinite weight: the tensor and the index of the first.
pub(crate) fn non_finite(ck: &dyn Checkpoint, name: &str, shape: &[usize], flat: usize, value: f32) -> Error {
    let mut index = vec![0; shape.len()];
    let mut rest = flat;
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            index[d] = rest % n;
            rest /= n;
        }
    }
    Error::load(ck.path(), format!("{name} holds {value} at index {index:?}: a checkpoint's weights must be finite (the file is corrupt or was saved after training diverged)"))
}
