//! Device-resident weights. Matrices are stored in nn.Linear layout [out, in] as 16-bit
//! floats packed two per u32 (fp16, or bf16 where a value is beyond the fp16 range) or,
//! for the big projections of layers asked to be quantized, as int8 or nf4 blocks made on
//! the device from the fp16 upload (shaders/quantize.wgsl), one row chunk at a time.
//! Matrices are split by rows into buffers no larger than the largest storage binding.
//! Small vectors are f32, packed per layer into one `consts` buffer at fixed offsets.
//! The embedding table stays in host memory: each call needs only its tokens' rows.

use half::{bf16, f16};

use super::config::Config;
use super::saved;
use crate::error::{Error, Result};
use crate::gpu::recorder::{Binding, Recorder};
use crate::gpu::{GpuContext, Kernel, Pipelines};
use crate::loader::{Checkpoint, DType};

/// How a matrix is held on the device (see shaders/matmul.wgsl for the layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F16,
    Bf16,
    /// Blocks of 64 along K: codes -127..127 and one f16 scale per block.
    Int8,
    /// Blocks of 64 along K: NormalFloat-4 codes and one f16 absmax per block.
    Nf4,
}

/// Quantized formats: blocks of this many columns share a scale.
pub const QUANT_BLOCK: usize = 64;

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F16 => "fp16",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Int8 => "int8",
            WeightFormat::Nf4 => "nf4",
        }
    }

    /// "fp16", "int8" or "nf4": the formats a caller may ask for.
    pub fn parse(name: &str) -> Result<WeightFormat> {
        match name {
            "fp16" => Ok(WeightFormat::F16),
            "int8" => Ok(WeightFormat::Int8),
            "nf4" => Ok(WeightFormat::Nf4),
            other => Err(Error::Invalid(format!("weight dtype {other:?} is not one of 'fp16', 'int8', 'nf4'"))),
        }
    }

    /// The matmul kernel's defines for this format.
    pub fn defines(self) -> &'static [&'static str] {
        match self {
            WeightFormat::F16 => &[],
            WeightFormat::Bf16 => &["WEIGHT_BF16"],
            WeightFormat::Int8 => &["WEIGHT_QUANT", "WEIGHT_INT8"],
            WeightFormat::Nf4 => &["WEIGHT_QUANT", "WEIGHT_NF4"],
        }
    }

    pub fn quantized(self) -> bool {
        matches!(self, WeightFormat::Int8 | WeightFormat::Nf4)
    }

    /// u32 words of codes per row of width k (16-bit formats: k / 2 pairs).
    pub fn code_words(self, k: usize) -> usize {
        match self {
            WeightFormat::F16 | WeightFormat::Bf16 => k / 2,
            WeightFormat::Int8 => k / 4,
            WeightFormat::Nf4 => k / 8,
        }
    }

    /// Device bytes of one row: codes, then (quantized) one u32 of two f16 scales per
    /// two blocks.
    pub fn row_bytes(self, k: usize) -> usize {
        let scales = if self.quantized() { k.div_ceil(2 * QUANT_BLOCK) } else { 0 };
        4 * (self.code_words(k) + scales)
    }

    /// Word offset of the scales in a chunk of `rows` rows (0 for 16-bit formats).
    pub fn scales_offset(self, rows: usize, k: usize) -> usize {
        if self.quantized() { rows * self.code_words(k) } else { 0 }
    }
}

/// Rows `row0..row0 + rows` of a matrix, from word `word_off` of `buffer` (several
/// matrices may share one buffer, so that one dispatch serves them all).
pub struct Chunk {
    pub buffer: wgpu::Buffer,
    pub word_off: usize,
    pub row0: usize,
    pub rows: usize,
}

/// A weight matrix [m, k] on the device.
pub struct Matrix {
    pub m: usize,
    pub k: usize,
    pub format: WeightFormat,
    pub chunks: Vec<Chunk>,
}

impl Matrix {
    pub fn chunk_bytes(&self, chunk: &Chunk) -> u64 {
        (chunk.rows * self.format.row_bytes(self.k)) as u64
    }

    pub fn device_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| self.chunk_bytes(c)).sum()
    }

    /// The buffer holding the whole matrix, if it is one chunk.
    pub fn single(&self) -> Option<&Chunk> {
        match self.chunks.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QuantizeParams { m: u32, k: u32, s_off: u32, _pad: u32 }

/// Offsets (in f32 elements, multiples of C) of the vectors in a layer's `consts`.
pub mod consts {
    pub const LN1_W: usize = 0;
    pub const LN1_B: usize = 1;
    pub const LN2_W: usize = 2;
    pub const LN2_B: usize = 3;
    /// x_r, x_w, x_k, x_v, x_a, x_g in that order.
    pub const ATT_MIX: usize = 4;
    pub const FFN_MIX: usize = 10;
    pub const W0: usize = 11;
    pub const A0: usize = 12;
    pub const V0: usize = 13;
    pub const K_K: usize = 14;
    pub const K_A: usize = 15;
    pub const R_K: usize = 16;
    pub const LNX_W: usize = 17;
    pub const LNX_B: usize = 18;
    pub const COUNT: usize = 19;
    /// Model-level vectors.
    pub const LN0_W: usize = 0;
    pub const LN0_B: usize = 1;
    pub const LNOUT_W: usize = 2;
    pub const LNOUT_B: usize = 3;
    pub const MODEL_COUNT: usize = 4;
}

pub struct Layer {
    pub consts: wgpu::Buffer,
    pub receptance: Matrix,
    pub key: Matrix,
    pub value: Matrix,
    pub output: Matrix,
    pub w1: Matrix,
    pub w2: Matrix,
    pub a1: Matrix,
    pub a2: Matrix,
    pub v1: Matrix,
    pub v2: Matrix,
    pub g1: Matrix,
    pub g2: Matrix,
    pub ffn_key: Matrix,
    pub ffn_value: Matrix,
}

impl Layer {
    /// In the order of LAYER_MATRICES.
    pub fn matrices(&self) -> [&Matrix; 14] {
        [
            &self.receptance, &self.key, &self.value, &self.output, &self.w1, &self.w2, &self.a1, &self.a2,
            &self.v1, &self.v2, &self.g1, &self.g2, &self.ffn_key, &self.ffn_value,
        ]
    }
}

pub struct Weights {
    pub consts: wgpu::Buffer,
    pub layers: Vec<Layer>,
    pub head: Matrix,
    /// Host copy of emb.weight, in the file's dtype.
    pub emb: Vec<u8>,
    pub emb_dtype: DType,
    pub device_bytes: u64,
    /// A hash of names, shapes and sampled bytes: tells one model's states from another's.
    pub fingerprint: u64,
}

/// Converts raw tensor bytes to f32 values; exact for every source dtype.
pub fn to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
        DType::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
        DType::U8 => bytes.iter().map(|&b| b as f32).collect(),
    }
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// What to quantize: a format per layer for its big projections (receptance, key,
/// value, output, ffn key and value) and one for the head. Everything else stays 16-bit.
/// `None`: as the file holds it (fp16 unless the file was saved quantized).
#[derive(Debug, Clone)]
pub struct Quantization {
    pub layers: Vec<Option<WeightFormat>>,
    pub head: Option<WeightFormat>,
}

/// The big projections of a layer: (official name, quantizable).
pub const LAYER_MATRICES: [(&str, bool); 14] = [
    ("att.receptance.weight", true), ("att.key.weight", true), ("att.value.weight", true), ("att.output.weight", true),
    ("att.w1", false), ("att.w2", false), ("att.a1", false), ("att.a2", false),
    ("att.v1", false), ("att.v2", false), ("att.g1", false), ("att.g2", false),
    ("ffn.key.weight", true), ("ffn.value.weight", true),
];

/// The vectors packed into layer `i`'s `consts`: (official name, slot, official shape).
pub fn layer_vectors(i: usize, c: usize, n_head: usize) -> Vec<(String, usize, Vec<usize>)> {
    use consts::*;
    let n = |s: &str| format!("blocks.{i}.{s}");
    let row = vec![c];
    let mix = vec![1, 1, c];
    vec![
        (n("ln1.weight"), LN1_W, row.clone()), (n("ln1.bias"), LN1_B, row.clone()),
        (n("ln2.weight"), LN2_W, row.clone()), (n("ln2.bias"), LN2_B, row.clone()),
        (n("att.x_r"), ATT_MIX, mix.clone()), (n("att.x_w"), ATT_MIX + 1, mix.clone()), (n("att.x_k"), ATT_MIX + 2, mix.clone()),
        (n("att.x_v"), ATT_MIX + 3, mix.clone()), (n("att.x_a"), ATT_MIX + 4, mix.clone()), (n("att.x_g"), ATT_MIX + 5, mix.clone()),
        (n("ffn.x_k"), FFN_MIX, mix.clone()), (n("att.w0"), W0, mix.clone()), (n("att.a0"), A0, mix.clone()),
        (n("att.v0"), V0, mix.clone()), (n("att.k_k"), K_K, mix.clone()), (n("att.k_a"), K_A, mix),
        (n("att.r_k"), R_K, vec![n_head, c / n_head]),
        (n("att.ln_x.weight"), LNX_W, row.clone()), (n("att.ln_x.bias"), LNX_B, row),
    ]
}

/// The model-level vectors in the model `consts`: (official name, slot).
pub const MODEL_VECTORS: [(&str, usize); 4] = [
    ("blocks.0.ln0.weight", consts::LN0_W), ("blocks.0.ln0.bias", consts::LN0_B),
    ("ln_out.weight", consts::LNOUT_W), ("ln_out.bias", consts::LNOUT_B),
];

pub struct Loader<'a> {
    pub ctx: &'a GpuContext,
    pub pipelines: &'a Pipelines,
    pub quant: &'a Quantization,
    pub ck: &'a dyn Checkpoint,
    pub config: &'a Config,
    pub device_bytes: u64,
    pub fingerprint: u64,
    pub progress: &'a mut dyn FnMut(usize, usize),
    pub done: usize,
    pub total: usize,
}

impl Loader<'_> {
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
        Ok(to_f32(&bytes, info.dtype))
    }

    fn upload(&mut self, label: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let size = (data.len() as u64).next_multiple_of(4).max(4);
        let device = &self.ctx.device;
        let buffer = self.ctx.scoped(&format!("allocating {label} ({size} bytes)"), || {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                // COPY_SRC: `Model::save` reads weights back.
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: true,
            })
        })?;
        {
            let mut view = buffer
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| Error::Device(format!("mapping {label} failed: {e}")))?;
            view.slice(..data.len()).copy_from_slice(data);
        }
        buffer.unmap();
        self.device_bytes += size;
        Ok(buffer)
    }

    /// Uploads `name` as a matrix [m, k]; `transpose` reads it as stored [k, m].
    fn matrix(&mut self, name: &str, m: usize, k: usize, transpose: bool) -> Result<Matrix> {
        if let Some(stored) = saved::stored_format(self.ck, name)? {
            return Err(Error::load(self.ck.path(), format!("{name} is saved as {}, but only the big projections and the head are ever quantized", stored.name())));
        }
        self.matrix_as(name, m, k, transpose, Some(WeightFormat::F16))
    }

    /// Rows per device buffer for a matrix k wide: the fp16 form fits one storage binding.
    fn rows_per_chunk(&self, m: usize, k: usize) -> usize {
        let max_rows = ((self.ctx.max_binding as usize) / (2 * k)).max(1);
        if max_rows >= m { m } else { (max_rows / 4 * 4).max(1) }
    }

    /// As `matrix`, held in `want` (None: as the file holds it). A matrix with values
    /// beyond the fp16 range, or whose width is not a multiple of the quantization
    /// block, stays 16-bit. A matrix the file holds quantized is uploaded as it is.
    fn matrix_as(&mut self, name: &str, m: usize, k: usize, transpose: bool, want: Option<WeightFormat>) -> Result<Matrix> {
        if let Some(stored) = saved::stored_format(self.ck, name)? {
            if want.is_some_and(|w| w != stored) {
                return Err(Error::load(self.ck.path(), format!(
                    "{name} is saved as {}; it cannot be loaded as {} (quantizing quantized weights again compounds the error): load it without a dtype, or load the original checkpoint",
                    stored.name(), want.map(|w| w.name()).unwrap_or("?"))));
            }
            return self.saved_matrix(name, m, k, stored);
        }
        let format = want.unwrap_or(WeightFormat::F16);
        let stored = self.ck.info(name).map(|i| i.shape).unwrap_or_default();
        let values = self.tensor(name, &[m, k])?;
        // A low-rank matrix converted for web-rwkv is already [out, in].
        let transpose = transpose && stored.first() != Some(&m);
        let at = |r: usize, c: usize| if transpose { values[c * m + r] } else { values[r * k + c] };
        let bf16_needed = values.iter().any(|v| v.abs() > 65504.0);
        let quantize = format != WeightFormat::F16 && !bf16_needed && k % QUANT_BLOCK == 0;
        let rows_per_chunk = self.rows_per_chunk(m, k);
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < m {
            let rows = rows_per_chunk.min(m - r0);
            let mut bytes = Vec::with_capacity(rows * k * 2);
            for r in r0..r0 + rows {
                for c in 0..k {
                    let bits = if bf16_needed { bf16::from_f32(at(r, c)).to_bits() } else { f16::from_f32(at(r, c)).to_bits() };
                    bytes.extend_from_slice(&bits.to_le_bytes());
                }
            }
            let upload = self.upload(name, &bytes)?;
            let buffer = if quantize { self.quantize(name, &upload, rows, k, format)? } else { upload };
            chunks.push(Chunk { buffer, word_off: 0, row0: r0, rows });
            r0 += rows;
        }
        if quantize {
            // Let the fp16 uploads go before the next tensor: peak memory stays one tensor
            // above the quantized model.
            self.ctx.wait()?;
        }
        let format = if quantize { format } else if bf16_needed { WeightFormat::Bf16 } else { WeightFormat::F16 };
        Ok(Matrix { m, k, format, chunks })
    }

    /// Uploads a matrix that a saved model holds as codes and scales, in the device
    /// layout of `format` (codes, then the scales as f16 pairs), one row chunk at a time.
    fn saved_matrix(&mut self, name: &str, m: usize, k: usize, format: WeightFormat) -> Result<Matrix> {
        let (codes, scales) = saved::read_quantized(self.ck, name, format, m, k)?;
        self.fingerprint = fnv(fnv(self.fingerprint, name.as_bytes()), &codes[..codes.len().min(256)]);
        self.done += 2;
        (self.progress)(self.done, self.total);
        let code_bytes = format.code_words(k) * 4;
        let blocks = k / QUANT_BLOCK;
        let scale_words = blocks.div_ceil(2);
        let rows_per_chunk = self.rows_per_chunk(m, k);
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < m {
            let rows = rows_per_chunk.min(m - r0);
            let mut bytes = Vec::with_capacity(rows * format.row_bytes(k));
            bytes.extend_from_slice(&codes[r0 * code_bytes..(r0 + rows) * code_bytes]);
            for r in r0..r0 + rows {
                let row = &scales[r * blocks * 2..(r + 1) * blocks * 2];
                bytes.extend_from_slice(row);
                bytes.resize(bytes.len() + (scale_words * 4 - row.len()), 0); // an odd block count leaves a half word
            }
            chunks.push(Chunk { buffer: self.upload(name, &bytes)?, word_off: 0, row0: r0, rows });
            r0 += rows;
        }
        Ok(Matrix { m, k, format, chunks })
    }

    /// Moves matrices that are each one chunk of the same format into one buffer, one
    /// after another, so that a single dispatch computes them all (shaders/matmul.wgsl
    /// groups). Left as they are when any is split or the whole would not fit a binding.
    fn share_buffer(&mut self, label: &str, matrices: &mut [&mut Matrix]) -> Result<()> {
        let format = matrices[0].format;
        if matrices.iter().any(|m| m.single().is_none() || m.format != format) {
            return Ok(());
        }
        let total: u64 = matrices.iter().map(|m| m.device_bytes()).sum();
        if total > self.ctx.max_binding {
            return Ok(());
        }
        let device = &self.ctx.device;
        let shared = self.ctx.scoped(&format!("allocating {label} ({total} bytes)"), || {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: total,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        })?;
        let mut encoder = device.create_command_encoder(&Default::default());
        let mut at = 0u64;
        for m in matrices.iter_mut() {
            let bytes = m.device_bytes();
            let chunk = &mut m.chunks[0];
            encoder.copy_buffer_to_buffer(&chunk.buffer, (chunk.word_off * 4) as u64, &shared, at, bytes);
            self.device_bytes -= chunk.buffer.size();
            chunk.buffer = shared.clone();
            chunk.word_off = (at / 4) as usize;
            at += bytes;
        }
        self.ctx.queue.submit([encoder.finish()]);
        self.device_bytes += total;
        Ok(())
    }

    /// Quantizes `rows` rows of fp16 pairs into a new buffer of `format`, on the device.
    fn quantize(&mut self, name: &str, fp16: &wgpu::Buffer, rows: usize, k: usize, format: WeightFormat) -> Result<wgpu::Buffer> {
        let size = (rows * format.row_bytes(k)) as u64;
        let device = &self.ctx.device;
        let buffer = self.ctx.scoped(&format!("allocating {name} as {} ({size} bytes)", format.name()), || {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(name),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        })?;
        let variant = if format == WeightFormat::Int8 { "INT8" } else { "NF4" };
        let pipeline = self.pipelines.get(Kernel::Quantize, "quantize", &[variant])?;
        let params = QuantizeParams { m: rows as u32, k: k as u32, s_off: format.scales_offset(rows, k) as u32, _pad: 0 };
        let invocations = rows * k.div_ceil(2 * QUANT_BLOCK);
        let mut rec = Recorder::new(self.ctx);
        rec.dispatch(&pipeline, &params, vec![Binding::whole(fp16), Binding::whole(&buffer)], (invocations.div_ceil(64) as u32, 1, 1));
        let mut uniform = None;
        rec.submit(self.ctx, &mut uniform)?;
        self.device_bytes += size;
        self.device_bytes -= fp16.size();
        Ok(buffer)
    }

    fn consts(&mut self, label: &str, parts: &[(&str, usize)], count: usize) -> Result<wgpu::Buffer> {
        let c = self.config.n_embd;
        let mut all = vec![0f32; count * c];
        for &(name, slot) in parts {
            let v = self.tensor(name, &[c])?;
            all[slot * c..(slot + 1) * c].copy_from_slice(&v);
        }
        self.upload(label, bytemuck::cast_slice(&all))
    }

    pub fn load(mut self) -> Result<Weights> {
        let cfg = self.config.clone();
        let (c, f, v) = (cfg.n_embd, cfg.ffn_size, cfg.vocab_size);
        use consts::*;
        let model_consts = self.consts("model consts", &MODEL_VECTORS, MODEL_COUNT)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |s: &str| format!("blocks.{i}.{s}");
            let names = layer_vectors(i, c, cfg.n_head);
            let refs: Vec<(&str, usize)> = names.iter().map(|(s, o, _)| (s.as_str(), *o)).collect();
            let consts = self.consts(&n("consts"), &refs, COUNT)?;
            let q = self.quant.layers.get(i).copied().flatten();
            let mut layer = Layer {
                consts,
                receptance: self.matrix_as(&n("att.receptance.weight"), c, c, false, q)?,
                key: self.matrix_as(&n("att.key.weight"), c, c, false, q)?,
                value: self.matrix_as(&n("att.value.weight"), c, c, false, q)?,
                output: self.matrix_as(&n("att.output.weight"), c, c, false, q)?,
                w1: self.matrix(&n("att.w1"), cfg.lora_w, c, true)?,
                w2: self.matrix(&n("att.w2"), c, cfg.lora_w, true)?,
                a1: self.matrix(&n("att.a1"), cfg.lora_a, c, true)?,
                a2: self.matrix(&n("att.a2"), c, cfg.lora_a, true)?,
                v1: self.matrix(&n("att.v1"), cfg.lora_v, c, true)?,
                v2: self.matrix(&n("att.v2"), c, cfg.lora_v, true)?,
                g1: self.matrix(&n("att.g1"), cfg.lora_g, c, true)?,
                g2: self.matrix(&n("att.g2"), c, cfg.lora_g, true)?,
                ffn_key: self.matrix_as(&n("ffn.key.weight"), f, c, false, q)?,
                ffn_value: self.matrix_as(&n("ffn.value.weight"), c, f, false, q)?,
            };
            // Matrices the forward pass runs together share a buffer (one dispatch each).
            let l = &mut layer;
            self.share_buffer(&n("att.rkv"), &mut [&mut l.receptance, &mut l.key, &mut l.value])?;
            self.share_buffer(&n("att.lora1"), &mut [&mut l.w1, &mut l.a1, &mut l.v1, &mut l.g1])?;
            self.share_buffer(&n("att.lora2"), &mut [&mut l.w2, &mut l.a2, &mut l.v2, &mut l.g2])?;
            layers.push(layer);
        }
        let head = self.matrix_as("head.weight", v, c, false, self.quant.head)?;
        // A saved model keeps the fingerprint of the checkpoint it was made from, so states
        // saved with either load into both.
        let fingerprint = saved::original_fingerprint(self.ck).unwrap_or(self.fingerprint);
        let emb_info = self.ck.info("emb.weight").ok_or_else(|| Error::load(self.ck.path(), "missing tensor \"emb.weight\""))?;
        let emb = self.ck.read("emb.weight")?.into_owned();
        if emb.len() != v * c * emb_info.dtype.size() {
            return Err(Error::load(self.ck.path(), format!("emb.weight holds {} bytes; expected {}", emb.len(), v * c * emb_info.dtype.size())));
        }
        self.done += 1;
        (self.progress)(self.done, self.total);
        Ok(Weights {
            consts: model_consts,
            layers,
            head,
            emb,
            emb_dtype: emb_info.dtype,
            device_bytes: self.device_bytes,
            fingerprint,
        })
    }
}
