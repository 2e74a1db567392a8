//! Device-resident weights. Matrices are stored in nn.Linear layout [out, in] as 16-bit
//! floats packed two per u32 (fp16, or bf16 where a value is beyond the fp16 range),
//! split by rows into buffers no larger than the largest storage binding. Small vectors
//! are f32, packed per layer into one `consts` buffer at fixed offsets. The embedding
//! table stays in host memory: each call needs only its tokens' rows.

use half::{bf16, f16};

use super::config::Config;
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::loader::{Checkpoint, DType};

/// A weight matrix [m, k] on the device.
pub struct Matrix {
    pub m: usize,
    pub k: usize,
    pub bf16: bool,
    /// (buffer, first row, rows) for each row chunk.
    pub chunks: Vec<(wgpu::Buffer, usize, usize)>,
}

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
    }
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub struct Loader<'a> {
    pub ctx: &'a GpuContext,
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
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
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
        let stored = self.ck.info(name).map(|i| i.shape).unwrap_or_default();
        let values = self.tensor(name, &[m, k])?;
        // A low-rank matrix converted for web-rwkv is already [out, in].
        let transpose = transpose && stored.first() != Some(&m);
        let at = |r: usize, c: usize| if transpose { values[c * m + r] } else { values[r * k + c] };
        let bf16_needed = values.iter().any(|v| v.abs() > 65504.0);
        let max_rows = ((self.ctx.max_binding as usize) / (2 * k)).max(1);
        let rows_per_chunk = if max_rows >= m { m } else { (max_rows / 4 * 4).max(1) };
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
            chunks.push((self.upload(name, &bytes)?, r0, rows));
            r0 += rows;
        }
        Ok(Matrix { m, k, bf16: bf16_needed, chunks })
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
        let model_consts = self.consts(
            "model consts",
            &[("blocks.0.ln0.weight", LN0_W), ("blocks.0.ln0.bias", LN0_B), ("ln_out.weight", LNOUT_W), ("ln_out.bias", LNOUT_B)],
            MODEL_COUNT,
        )?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |s: &str| format!("blocks.{i}.{s}");
            let names: Vec<(String, usize)> = vec![
                (n("ln1.weight"), LN1_W), (n("ln1.bias"), LN1_B), (n("ln2.weight"), LN2_W), (n("ln2.bias"), LN2_B),
                (n("att.x_r"), ATT_MIX), (n("att.x_w"), ATT_MIX + 1), (n("att.x_k"), ATT_MIX + 2),
                (n("att.x_v"), ATT_MIX + 3), (n("att.x_a"), ATT_MIX + 4), (n("att.x_g"), ATT_MIX + 5),
                (n("ffn.x_k"), FFN_MIX), (n("att.w0"), W0), (n("att.a0"), A0), (n("att.v0"), V0),
                (n("att.k_k"), K_K), (n("att.k_a"), K_A), (n("att.r_k"), R_K),
                (n("att.ln_x.weight"), LNX_W), (n("att.ln_x.bias"), LNX_B),
            ];
            let refs: Vec<(&str, usize)> = names.iter().map(|(s, o)| (s.as_str(), *o)).collect();
            let consts = self.consts(&n("consts"), &refs, COUNT)?;
            layers.push(Layer {
                consts,
                receptance: self.matrix(&n("att.receptance.weight"), c, c, false)?,
                key: self.matrix(&n("att.key.weight"), c, c, false)?,
                value: self.matrix(&n("att.value.weight"), c, c, false)?,
                output: self.matrix(&n("att.output.weight"), c, c, false)?,
                w1: self.matrix(&n("att.w1"), cfg.lora_w, c, true)?,
                w2: self.matrix(&n("att.w2"), c, cfg.lora_w, true)?,
                a1: self.matrix(&n("att.a1"), cfg.lora_a, c, true)?,
                a2: self.matrix(&n("att.a2"), c, cfg.lora_a, true)?,
                v1: self.matrix(&n("att.v1"), cfg.lora_v, c, true)?,
                v2: self.matrix(&n("att.v2"), c, cfg.lora_v, true)?,
                g1: self.matrix(&n("att.g1"), cfg.lora_g, c, true)?,
                g2: self.matrix(&n("att.g2"), c, cfg.lora_g, true)?,
                ffn_key: self.matrix(&n("ffn.key.weight"), f, c, false)?,
                ffn_value: self.matrix(&n("ffn.value.weight"), c, f, false)?,
            });
        }
        let head = self.matrix("head.weight", v, c, false)?;
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
            fingerprint: self.fingerprint,
        })
    }
}
