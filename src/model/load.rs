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

use half::{bf16, f16};

use super::config::Config;
use super::saved;
use super::weights::{consts, fnv, layer_vectors, to_f32_into, Chunk, Layer, Matrix, Weights, WeightFormat, MODEL_VECTORS, QUANT_BLOCK};
use crate::error::{Error, Result};
use crate::gpu::recorder::{Binding, Recorder};
use crate::gpu::{Codes, GpuContext, Pipelines, Variant};
use crate::loader::Checkpoint;
use crate::model::weights::Quantization;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QuantizeParams { m: u32, k: u32, s_off: u32, dst_off: u32 }

/// A matrix to allocate: its checkpoint name, shape [m, k] and device format.
struct Plan {
    name: String,
    m: usize,
    k: usize,
    format: WeightFormat,
}

impl Plan {
    /// Its bytes, rounded up so that the next matrix in a shared buffer starts on a
    /// 16-byte boundary (the matmul kernels read rows as vec4s).
    fn padded_bytes(&self) -> usize {
        (self.m * self.format.row_bytes(self.k)).next_multiple_of(16)
    }
}

pub struct Loader<'a> {
    pub ctx: &'a GpuContext,
    pub pipelines: &'a Pipelines,
    pub quant: &'a Quantization,
    pub ck: &'a dyn Checkpoint,
    pub config: &'a Config,
    pub progress: &'a mut dyn FnMut(usize, usize),
    device_bytes: u64,
    fingerprint: u64,
    done: usize,
    total: usize,
    /// fp16 input of the quantize kernel, reused by every quantized row chunk.
    quant_input: Option<wgpu::Buffer>,
    /// Host buffers reused for every tensor (its values as f32; a row chunk's 16-bit
    /// form), so that loading does not leave a trail of freed allocations in the heap.
    values: Vec<f32>,
    upload: Vec<u8>,
}

impl<'a> Loader<'a> {
    pub fn new(ctx: &'a GpuContext, pipelines: &'a Pipelines, quant: &'a Quantization, ck: &'a dyn Checkpoint, config: &'a Config,
               progress: &'a mut dyn FnMut(usize, usize)) -> Self {
        let total = ck.names().len();
        Loader { ctx, pipelines, quant, ck, config, progress, device_bytes: 0, fingerprint: 0xcbf2_9ce4_8422_2325, done: 0, total, quant_input: None, values: Vec::new(), upload: Vec::new() }
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

    /// Rows per device buffer for a matrix k wide: the fp16 form fits one storage binding.
    fn rows_per_chunk(&self, m: usize, k: usize) -> usize {
        let max_rows = ((self.ctx.max_binding as usize) / (2 * k)).max(1);
        if max_rows >= m { m } else { (max_rows / 4 * 4).max(1) }
    }

    /// The format `name` will be held in: as a saved model holds it, else `want` (None:
    /// fp16). Only the big projections and the head (`quantizable`) may be quantized, and
    /// only when k is a multiple of the quantization block.
    fn plan(&self, name: String, m: usize, k: usize, want: Option<WeightFormat>, quantizable: bool) -> Result<Plan> {
        let path = self.ck.path();
        let format = match saved::stored_format(self.ck, &name)? {
            Some(stored) if !quantizable => {
                return Err(Error::load(path, format!("{name} is saved as {}, but only the big projections and the head are ever quantized", stored.name())));
            }
            Some(stored) if want.is_some_and(|w| w != stored) => {
                return Err(Error::load(path, format!(
                    "{name} is saved as {}; it cannot be loaded as {} (quantizing quantized weights again compounds the error): load it without a dtype, or load the original checkpoint",
                    stored.name(), want.map(|w| w.name()).unwrap_or("?"))));
            }
            Some(stored) => stored,
            None => match want.unwrap_or(WeightFormat::F16) {
                f if f.quantized() && k % QUANT_BLOCK != 0 => WeightFormat::F16,
                f => f,
            },
        };
        Ok(Plan { name, m, k, format })
    }

    /// Whether `plans` fit one buffer: each is one chunk and the whole fits a binding.
    fn fit_one_buffer(&self, plans: &[Plan]) -> bool {
        let total: usize = plans.iter().map(Plan::padded_bytes).sum();
        plans.iter().all(|p| self.rows_per_chunk(p.m, p.k) >= p.m) && total as u64 <= self.ctx.max_binding
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
                    let chunk = Chunk { buffer: buffer.clone(), word_off: word, row0: 0, rows: p.m };
                    word += p.padded_bytes() / 4;
                    Matrix { m: p.m, k: p.k, format: p.format, chunks: vec![chunk] }
                })
                .collect());
        }
        plans.iter().map(|p| self.allocate_one(p.m, p.k, p.format, &p.name)).collect()
    }

    fn allocate_one(&mut self, m: usize, k: usize, format: WeightFormat, name: &str) -> Result<Matrix> {
        let per = self.rows_per_chunk(m, k);
        let mut chunks = Vec::new();
        for row0 in (0..m).step_by(per) {
            let rows = per.min(m - row0);
            chunks.push(Chunk { buffer: self.buffer(name, (rows * format.row_bytes(k)) as u64)?, word_off: 0, row0, rows });
        }
        Ok(Matrix { m, k, format, chunks })
    }

    // ---- phase 2: fill ----

    /// The tensor's values as f32, in the reused `values` buffer (give it back after use).
    fn tensor(&mut self, name: &str, expect: &[usize]) -> Result<Vec<f32>> {
        let info = self.ck.info(name).ok_or_else(|| Error::load(self.ck.path(), format!("missing tensor {name:?}")))?;
        let numel: usize = expect.iter().product();
        if info.numel() != numel {
            return Err(Error::load(self.ck.path(), format!("tensor {name:?} has shape {:?}; expected {expect:?}", info.shape)));
        }
        let bytes = self.ck.read(name)?;
        if bytes.len() != numel * info.dtype.size() {
            return Err(Error::load(self.ck.path(), format!("tensor {name:?} holds {} bytes; expected {}", bytes.len(), numel * info.dtype.size())));
        }
        self.fingerprint = fnv(fnv(self.fingerprint, name.as_bytes()), &bytes[..bytes.len().min(256)]);
        self.fingerprint = fnv(self.fingerprint, &bytes[bytes.len().saturating_sub(256)..]);
        self.done += 1;
        (self.progress)(self.done, self.total);
        let mut values = std::mem::take(&mut self.values);
        values.clear();
        to_f32_into(&bytes, info.dtype, &mut values);
        Ok(values)
    }

    /// Sends the writes queued so far and waits for them, so that their staging memory
    /// is freed before the next tensor's is made.
    fn flush(&self) -> Result<()> {
        self.ctx.queue.submit([]);
        self.ctx.wait()
    }

    fn fill_consts(&mut self, buffer: &wgpu::Buffer, parts: &[(&str, usize)]) -> Result<()> {
        let c = self.config.n_embd;
        let mut all = vec![0f32; (buffer.size() as usize) / 4];
        for &(name, slot) in parts {
            let v = self.tensor(name, &[c])?;
            all[slot * c..(slot + 1) * c].copy_from_slice(&v);
            self.values = v;
        }
        self.ctx.queue.write_buffer(buffer, 0, bytemuck::cast_slice(&all));
        Ok(())
    }

    /// Fills `matrix` from the checkpoint tensor `name` ([m, k], or [k, m] when
    /// `transpose`). A matrix with values beyond the fp16 range is kept as bf16: when
    /// it was planned quantized, it moves to buffers of its own.
    fn fill(&mut self, name: &str, matrix: &mut Matrix, transpose: bool) -> Result<()> {
        let (m, k) = (matrix.m, matrix.k);
        if saved::stored_format(self.ck, name)?.is_some() {
            return self.fill_saved(name, matrix);
        }
        let values = self.tensor(name, &[m, k])?;
        // A low-rank matrix converted for web-rwkv is already [out, in].
        let stored = self.ck.info(name).map(|i| i.shape).unwrap_or_default();
        let transpose = transpose && stored.first() != Some(&m);
        let at = |r: usize, c: usize| if transpose { values[c * m + r] } else { values[r * k + c] };
        let bf16_needed = values.iter().any(|v| v.abs() > 65504.0);
        if bf16_needed && matrix.format.quantized() {
            *matrix = self.allocate_one(m, k, WeightFormat::Bf16, name)?;
        } else if bf16_needed {
            matrix.format = WeightFormat::Bf16;
        }
        let mut bytes = std::mem::take(&mut self.upload);
        for chunk in &matrix.chunks {
            bytes.clear();
            for r in chunk.row0..chunk.row0 + chunk.rows {
                for c in 0..k {
                    let bits = if bf16_needed { bf16::from_f32(at(r, c)).to_bits() } else { f16::from_f32(at(r, c)).to_bits() };
                    bytes.extend_from_slice(&bits.to_le_bytes());
                }
            }
            if matrix.format.quantized() {
                self.quantize(name, &bytes, chunk, k, matrix.format)?;
            } else {
                self.ctx.queue.write_buffer(&chunk.buffer, (chunk.word_off * 4) as u64, &bytes);
            }
        }
        self.upload = bytes;
        self.values = values;
        self.flush()
    }

    /// Quantizes one row chunk of fp16 pairs into `chunk`, on the device.
    fn quantize(&mut self, name: &str, fp16: &[u8], chunk: &Chunk, k: usize, format: WeightFormat) -> Result<()> {
        if self.quant_input.as_ref().is_none_or(|b| b.size() < fp16.len() as u64) {
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
            self.quant_input = Some(self.ctx.create_buffer("quantization input", fp16.len() as u64, usage)?);
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
        rec.dispatch(&pipeline, &params, vec![Binding::whole(&input), Binding::whole(&chunk.buffer)], (gx, gy, 1));
        rec.submit(self.ctx).map_err(|e| match e {
            Error::Device(msg) => Error::Device(format!("quantizing {name}: {msg}")),
            other => other,
        })?;
        Ok(())
    }

    /// Fills a matrix that a saved model holds as codes and scales, in the device layout
    /// of its format (codes, then the scales as f16 pairs), one row chunk at a time.
    fn fill_saved(&mut self, name: &str, matrix: &Matrix) -> Result<()> {
        let (m, k, format) = (matrix.m, matrix.k, matrix.format);
        let (codes, scales) = saved::read_quantized(self.ck, name, format, m, k)?;
        self.fingerprint = fnv(fnv(self.fingerprint, name.as_bytes()), &codes[..codes.len().min(256)]);
        self.done += 2;
        (self.progress)(self.done, self.total);
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

    pub fn load(mut self) -> Result<Weights> {
        let cfg = self.config.clone();
        let (c, f, v) = (cfg.n_embd, cfg.ffn_size, cfg.vocab_size);
        let (dw, da, dv, dg) = (cfg.lora_w, cfg.lora_a, cfg.lora_v, cfg.lora_g);

        // Phase 1: every buffer, before any data.
        let model_consts = self.buffer("model consts", (consts::MODEL_COUNT * c * 4) as u64)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |s: &str| format!("blocks.{i}.{s}");
            let q = self.quant.layers.get(i).copied().flatten();
            let fp16 = Some(WeightFormat::F16);
            let layer_consts = self.buffer(&n("consts"), (consts::COUNT * c * 4) as u64)?;
            // In the order the forward pass reads them. Matrices it runs together (r/k/v;
            // the low-rank first stages; the second stages) must share a buffer to run as
            // one dispatch: best, the whole layer is one buffer (an allocation of exactly
            // its size, no allocator block shared with anything else).
            let plans = [
                self.plan(n("att.receptance.weight"), c, c, q, true)?,
                self.plan(n("att.key.weight"), c, c, q, true)?,
                self.plan(n("att.value.weight"), c, c, q, true)?,
                self.plan(n("att.w1"), dw, c, fp16, false)?,
                self.plan(n("att.a1"), da, c, fp16, false)?,
                self.plan(n("att.v1"), dv, c, fp16, false)?,
                self.plan(n("att.g1"), dg, c, fp16, false)?,
                self.plan(n("att.w2"), c, dw, fp16, false)?,
                self.plan(n("att.a2"), c, da, fp16, false)?,
                self.plan(n("att.v2"), c, dv, fp16, false)?,
                self.plan(n("att.g2"), c, dg, fp16, false)?,
                self.plan(n("att.output.weight"), c, c, q, true)?,
                self.plan(n("ffn.key.weight"), f, c, q, true)?,
                self.plan(n("ffn.value.weight"), c, f, q, true)?,
            ];
            let matrices = if self.fit_one_buffer(&plans) {
                self.allocate(&n("weights"), &plans)?
            } else {
                let mut parts = self.allocate(&n("att.rkv"), &plans[..3])?;
                if self.fit_one_buffer(&plans[3..11]) {
                    parts.extend(self.allocate(&n("att.lora"), &plans[3..11])?);
                } else {
                    parts.extend(self.allocate(&n("att.lora1"), &plans[3..7])?);
                    parts.extend(self.allocate(&n("att.lora2"), &plans[7..11])?);
                }
                for p in &plans[11..] {
                    parts.push(self.allocate_one(p.m, p.k, p.format, &p.name)?);
                }
                parts
            };
            let [receptance, key, value, w1, a1, v1, g1, w2, a2, v2, g2, output, ffn_key, ffn_value] = take(matrices);
            layers.push(Layer {
                consts: layer_consts, receptance, key, value, output, w1, w2, a1, a2, v1, v2, g1, g2, ffn_key, ffn_value,
            });
        }
        let head_plan = self.plan("head.weight".into(), v, c, self.quant.head, true)?;
        let mut head = self.allocate_one(v, c, head_plan.format, "head.weight")?;

        // Phase 2: fill, tensor by tensor.
        self.fill_consts(&model_consts, &MODEL_VECTORS)?;
        for (i, layer) in layers.iter_mut().enumerate() {
            let names = layer_vectors(i, c, cfg.n_head);
            let refs: Vec<(&str, usize)> = names.iter().map(|(s, o, _)| (s.as_str(), *o)).collect();
            self.fill_consts(&layer.consts, &refs)?;
            let n = |s: &str| format!("blocks.{i}.{s}");
            for (name, matrix, transpose) in [
                ("att.receptance.weight", &mut layer.receptance, false), ("att.key.weight", &mut layer.key, false),
                ("att.value.weight", &mut layer.value, false), ("att.output.weight", &mut layer.output, false),
                ("att.w1", &mut layer.w1, true), ("att.w2", &mut layer.w2, true), ("att.a1", &mut layer.a1, true),
                ("att.a2", &mut layer.a2, true), ("att.v1", &mut layer.v1, true), ("att.v2", &mut layer.v2, true),
                ("att.g1", &mut layer.g1, true), ("att.g2", &mut layer.g2, true),
                ("ffn.key.weight", &mut layer.ffn_key, false), ("ffn.value.weight", &mut layer.ffn_value, false),
            ] {
                self.fill(&n(name), matrix, transpose)?;
            }
        }
        self.fill("head.weight", &mut head, false)?;
        self.quant_input = None;
        self.values = Vec::new();
        self.upload = Vec::new();

        let emb_info = self.ck.info("emb.weight").ok_or_else(|| Error::load(self.ck.path(), "missing tensor \"emb.weight\""))?;
        let emb = self.ck.read("emb.weight")?.into_owned();
        if emb.len() != v * c * emb_info.dtype.size() {
            return Err(Error::load(self.ck.path(), format!("emb.weight holds {} bytes; expected {}", emb.len(), v * c * emb_info.dtype.size())));
        }
        self.done += 1;
        (self.progress)(self.done, self.total);
        // A saved model keeps the fingerprint of the checkpoint it was made from, so states
        // saved with either load into both.
        let fingerprint = saved::original_fingerprint(self.ck).unwrap_or(self.fingerprint);
        // Buffers a matrix left for bf16 (rare) are counted as the memory report counts.
        Ok(Weights { consts: model_consts, layers, head, emb, emb_dtype: emb_info.dtype, device_bytes: self.device_bytes, fingerprint })
    }
}

/// A Vec of exactly N matrices as an array (allocate returns one per plan).
fn take<const N: usize>(matrices: Vec<Matrix>) -> [Matrix; N] {
    matrices.try_into().unwrap_or_else(|v: Vec<Matrix>| panic!("expected {N} matrices, got {}", v.len()))
}
