//! Device-resident weights. Matrices are stored in nn.Linear layout [out, in] (the
//! channel mix's value projection input-major, [in, out]: see `Layout`) as 16-bit
//! floats packed two per u32 (fp16, or bf16 where a value is beyond the fp16 range) or,
//! for the big projections of layers asked to be quantized, as int8 or nf4 blocks made on
//! the device from the fp16 upload (shaders/quantize.wgsl), one row chunk at a time.
//! Matrices are split by rows into buffers no larger than the largest storage binding;
//! matrices that one dispatch computes together (r/k/v, the low-rank stages) share one.
//! `load.rs` allocates and fills them. Small vectors are f32, packed per layer into one `consts` buffer at fixed offsets.
//! The embedding table (and DeepEmbed's per-layer tables) stay in host memory
//! (`host_table.rs`): each call needs only its tokens' rows.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::host_table::HostTable;
use crate::error::{Error, Result};
use crate::loader::DType;
use crate::schema::LayerMatrix;

/// How a matrix's elements are coded on the device (see shaders/matmul_common.wgsl).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F16,
    Bf16,
    /// Blocks of 64 along a stored row: codes -127..127 and one f16 scale per block.
    Int8,
    /// Blocks of 64 along a stored row: NormalFloat-4 codes and one f16 absmax per block.
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
            other => {
                Err(Error::Invalid(format!("weight dtype {other:?} is not one of 'fp16', 'int8', 'nf4'")))
            }
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
        if self.quantized() {
            rows * self.code_words(k)
        } else {
            0
        }
    }
}

/// How a matrix's elements lie in its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// nn.Linear's [out, in]: each output's weights side by side (the matvec and GEMM
    /// kernels' usual layout; quantized blocks run along the inputs).
    OutputMajor,
    /// [in, out]: each input's weights side by side, so that a product can skip the rows
    /// of inputs that are zero (the channel mix's value projection in decode,
    /// shaders/matmul_sparse.wgsl). Quantized blocks run along the outputs.
    InputMajor,
}

/// Rows `row0..row0 + rows` of a matrix (stored rows: inputs for an input-major one), from word `word_off` of `buffer` (several
/// matrices may share one buffer, so that one dispatch serves them all).
pub struct Chunk {
    pub buffer: wgpu::Buffer,
    pub word_off: usize,
    pub row0: usize,
    pub rows: usize,
}

/// A weight matrix [m, k] = [out, in] on the device, stored in `layout`.
pub struct Matrix {
    pub m: usize,
    pub k: usize,
    pub format: WeightFormat,
    pub layout: Layout,
    pub chunks: Vec<Chunk>,
}

impl Matrix {
    /// (rows, width) as stored: [m, k], or [k, m] when input-major.
    pub fn stored(&self) -> (usize, usize) {
        stored_shape(self.m, self.k, self.layout)
    }

    pub fn chunk_bytes(&self, chunk: &Chunk) -> u64 {
        (chunk.rows * self.format.row_bytes(self.stored().1)) as u64
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

/// (rows, width) of an [m, k] matrix stored in `layout`.
pub fn stored_shape(m: usize, k: usize, layout: Layout) -> (usize, usize) {
    match layout {
        Layout::OutputMajor => (m, k),
        Layout::InputMajor => (k, m),
    }
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
    /// RWKV-7a DeepEmbed models only.
    pub deep: Option<DeepLayer>,
}

/// A layer's DeepEmbed tensors: `s_emb_x` [r*r, C] and `s1` (as [r, C]) on the device with
/// the layer's matrices (s1 in the ffn key's buffer, so that one dispatch computes both),
/// `s0` and `s2` as f32 in `consts` (`deep_consts` offsets), the table in host memory.
pub struct DeepLayer {
    pub emb_x: Matrix,
    pub s1: Matrix,
    pub consts: wgpu::Buffer,
    pub table: HostTable,
}

/// Offsets (f32 elements) in a DeepLayer's `consts`: s0 [F], then s2 transposed, [F, r]
/// row-major (each output row's r weights side by side).
pub mod deep_consts {
    pub const S0: usize = 0;
    pub fn s2(f: usize) -> usize {
        f
    }
    pub fn len(f: usize, r: usize) -> usize {
        f + f * r
    }
}

impl Layer {
    pub fn matrix(&self, which: LayerMatrix) -> &Matrix {
        use LayerMatrix::*;
        match which {
            Receptance => &self.receptance,
            Key => &self.key,
            Value => &self.value,
            Output => &self.output,
            W1 => &self.w1,
            W2 => &self.w2,
            A1 => &self.a1,
            A2 => &self.a2,
            V1 => &self.v1,
            V2 => &self.v2,
            G1 => &self.g1,
            G2 => &self.g2,
            FfnKey => &self.ffn_key,
            FfnValue => &self.ffn_value,
        }
    }

    pub fn matrix_mut(&mut self, which: LayerMatrix) -> &mut Matrix {
        use LayerMatrix::*;
        match which {
            Receptance => &mut self.receptance,
            Key => &mut self.key,
            Value => &mut self.value,
            Output => &mut self.output,
            W1 => &mut self.w1,
            W2 => &mut self.w2,
            A1 => &mut self.a1,
            A2 => &mut self.a2,
            V1 => &mut self.v1,
            V2 => &mut self.v2,
            G1 => &mut self.g1,
            G2 => &mut self.g2,
            FfnKey => &mut self.ffn_key,
            FfnValue => &mut self.ffn_value,
        }
    }
}

pub struct Weights {
    pub consts: wgpu::Buffer,
    pub layers: Vec<Layer>,
    pub head: Matrix,
    /// emb.weight, in host memory.
    pub emb: HostTable,
    pub device_bytes: u64,
    /// A hash of names, shapes and sampled bytes: tells one model's states from another's.
    pub fingerprint: u64,
}

/// Converts raw tensor bytes to f32 values; exact for every source dtype.
pub fn to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    let mut out = Vec::new();
    to_f32_into(bytes, dtype, &mut out);
    out
}

/// As `to_f32`, appending to `out` (which a caller may reuse across tensors).
pub fn to_f32_into(bytes: &[u8], dtype: DType, out: &mut Vec<f32>) {
    out.reserve(bytes.len() / dtype.size());
    match dtype {
        DType::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        // 16-bit values through half's slice conversion (for fp16, vector instructions
        // where the CPU has them: F16C on x86) when the bytes are aligned for it, as a
        // mapped file's tensors mostly are.
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(halves) if cfg!(target_endian = "little") => {
                convert_into(out, halves.len(), |o| halves.convert_to_f32_slice(o))
            }
            _ => out.extend(
                bytes.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
            ),
        },
        DType::BF16 => match bytemuck::try_cast_slice::<u8, bf16>(bytes) {
            Ok(halves) if cfg!(target_endian = "little") => {
                convert_into(out, halves.len(), |o| halves.convert_to_f32_slice(o))
            }
            _ => out.extend(
                bytes.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
            ),
        },
        DType::I8 => out.extend(bytes.iter().map(|&b| b as i8 as f32)),
        DType::U8 => out.extend(bytes.iter().map(|&b| b as f32)),
    }
}

/// Appends `n` values to `out`, written by `convert` into the new tail.
fn convert_into(out: &mut Vec<f32>, n: usize, convert: impl FnOnce(&mut [f32])) {
    let start = out.len();
    out.resize(start + n, 0.0);
    convert(&mut out[start..]);
}

pub(crate) fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_values_convert_the_same_aligned_or_not() {
        // Every bit pattern, against half's conversion of one value: exact bits, NaN as
        // any NaN (the loader rejects NaN and infinity after converting). The unaligned
        // copy takes the byte-at-a-time path: its byte order and offsets are what it checks.
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let aligned: &[u8] = bytemuck::cast_slice(&bits);
        let mut shifted = vec![0u8; aligned.len() + 2];
        let start = 1 + (shifted.as_ptr() as usize & 1); // an odd address
        let shifted = &mut shifted[start..][..aligned.len()];
        shifted.copy_from_slice(aligned);
        assert!(bytemuck::try_cast_slice::<u8, u16>(shifted).is_err(), "the copy must be unaligned");
        for dtype in [DType::F16, DType::BF16] {
            let (mut fast, mut slow) = (vec![7.0], vec![7.0]);
            to_f32_into(aligned, dtype, &mut fast);
            to_f32_into(shifted, dtype, &mut slow);
            assert_eq!(fast.len(), bits.len() + 1);
            assert_eq!(fast[0], 7.0, "{dtype:?}: the values already there are kept");
            for (i, &b) in bits.iter().enumerate() {
                let want = if dtype == DType::F16 {
                    f16::from_bits(b).to_f32()
                } else {
                    bf16::from_bits(b).to_f32()
                };
                for (got, how) in [(fast[i + 1], "aligned"), (slow[i + 1], "unaligned")] {
                    assert!(
                        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                        "{dtype:?} {b:#06x} {how}: {got} != {want}"
                    );
                }
            }
        }
    }
}
