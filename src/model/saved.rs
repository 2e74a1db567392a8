//! Saved models: a loaded model written back as it sits on the device, so that
//! quantization is done once. One `.safetensors` file with the official tensor names and
//! layouts, which `Model::open` reads like any checkpoint:
//!
//! - 16-bit matrices as F16/BF16, vectors as F32 (their device form), the embedding
//!   table in the dtype it was loaded from;
//! - a quantized matrix `NAME` as `NAME.codes` and `NAME.scales`, with metadata
//!   `quant.NAME` = "int8" or "nf4":
//!   - int8: codes I8 [M, K] (-127..127), scales F16 [M, K/64]; w = code * scale;
//!   - nf4: codes U8 [M, K/2], column 2j in the low nibble of byte j and 2j+1 in the
//!     high one, scales F16 [M, K/64] (block absmax); w = NF4[code] * scale;
//!   - with metadata `layout.NAME` = "input-major" (the ffn value projection, stored for
//!     sparse decode), the codes and scales are of the transposed matrix [K, M], blocks
//!     running along M;
//! - metadata `format` = "rwkv-gpu model v1" and `fingerprint`, the weights fingerprint
//!   of the checkpoint it came from (states saved with either model load into both).
//!
//! The file is written tensor by tensor (host memory stays one matrix) to a temporary
//! name beside the target, then renamed: a failed save leaves no partial file.

use std::borrow::Cow;
use std::path::Path;

use super::host_table::HostTable;
use super::weights::{deep_consts, Layout, Matrix, WeightFormat, QUANT_BLOCK};
use super::Model;
use crate::error::{Error, Result, Saving};
use crate::loader::{Checkpoint, DType};
use crate::schema::{self, DeepPart, Role, Scope};

pub const FORMAT: &str = "rwkv-gpu model v1";

fn quant_key(name: &str) -> String {
    format!("quant.{name}")
}

fn layout_key(name: &str) -> String {
    format!("layout.{name}")
}

const INPUT_MAJOR: &str = "input-major";

/// The layout a saved model holds quantized matrix `name` in (None: not saved quantized,
/// so the loader chooses).
pub fn stored_layout(ck: &dyn Checkpoint, name: &str) -> Result<Option<Layout>> {
    if stored_format(ck, name)?.is_none() {
        return Ok(None);
    }
    match ck.metadata(&layout_key(name)).as_deref() {
        None => Ok(Some(Layout::OutputMajor)),
        Some(INPUT_MAJOR) => Ok(Some(Layout::InputMajor)),
        Some(other) => Err(Error::load(ck.path(), format!("{name} is saved in layout {other:?}, which this version does not read ({INPUT_MAJOR:?} or none)"))),
    }
}

/// The format a saved model holds `name` in, if it holds it quantized.
pub fn stored_format(ck: &dyn Checkpoint, name: &str) -> Result<Option<WeightFormat>> {
    match ck.metadata(&quant_key(name)).as_deref() {
        None => Ok(None),
        Some("int8") => Ok(Some(WeightFormat::Int8)),
        Some("nf4") => Ok(Some(WeightFormat::Nf4)),
        Some(other) => Err(Error::load(
            ck.path(),
            format!("{name} is saved in format {other:?}, which this version does not read (int8, nf4)"),
        )),
    }
}

/// The shape of matrix `name` [M, K] whether it is stored plainly or quantized.
pub fn matrix_shape(ck: &dyn Checkpoint, name: &str) -> Result<Option<Vec<usize>>> {
    if let Some(info) = ck.info(name) {
        return Ok(Some(info.shape));
    }
    let Some(format) = stored_format(ck, name)? else { return Ok(None) };
    let codes = ck.info(&format!("{name}.codes")).map(|i| i.shape);
    let stored = match (format, codes.as_deref()) {
        (WeightFormat::Nf4, Some([m, half])) => vec![*m, 2 * half],
        (_, Some([m, k])) => vec![*m, *k],
        _ => return Ok(None),
    };
    Ok(Some(match stored_layout(ck, name)? {
        Some(Layout::InputMajor) => vec![stored[1], stored[0]],
        _ => stored,
    }))
}

pub fn original_fingerprint(ck: &dyn Checkpoint) -> Option<u64> {
    if ck.metadata("format").as_deref() != Some(FORMAT) {
        return None;
    }
    u64::from_str_radix(&ck.metadata("fingerprint")?, 16).ok()
}

/// The tensors that hold a quantized matrix `name` [m, k]: (name, dtype, shape) of its
/// codes and of its scales.
pub fn quantized_tensors(
    name: &str,
    format: WeightFormat,
    m: usize,
    k: usize,
) -> [(String, DType, Vec<usize>); 2] {
    let (code_dtype, code_shape) = match format {
        WeightFormat::Int8 => (DType::I8, vec![m, k]),
        _ => (DType::U8, vec![m, k / 2]),
    };
    [
        (format!("{name}.codes"), code_dtype, code_shape),
        (format!("{name}.scales"), DType::F16, vec![m, k / QUANT_BLOCK]),
    ]
}

/// A quantized matrix's (codes, scales) bytes.
pub type CodesAndScales<'a> = (Cow<'a, [u8]>, Cow<'a, [u8]>);

/// (codes, scales) of a quantized matrix [m, k], checked against the format's shapes.
pub fn read_quantized<'a>(
    ck: &'a dyn Checkpoint,
    name: &str,
    format: WeightFormat,
    m: usize,
    k: usize,
) -> Result<CodesAndScales<'a>> {
    if !k.is_multiple_of(QUANT_BLOCK) {
        return Err(Error::load(
            ck.path(),
            format!("{name}: width {k} is not a multiple of the {QUANT_BLOCK}-wide quantization block"),
        ));
    }
    let expect = quantized_tensors(name, format, m, k);
    for (tensor, dtype, shape) in &expect {
        let info = ck.info(tensor).ok_or_else(|| {
            Error::load(
                ck.path(),
                format!("missing tensor {tensor:?} of the {} matrix {name}", format.name()),
            )
        })?;
        if info.dtype != *dtype || info.shape != *shape {
            return Err(Error::load(
                ck.path(),
                format!(
                    "tensor {tensor:?} is {:?} {:?}; expected {dtype:?} {shape:?}",
                    info.dtype, info.shape
                ),
            ));
        }
    }
    Ok((ck.read(&expect[0].0)?, ck.read(&expect[1].0)?))
}

/// A tensor header in the file: name, safetensors dtype, shape.
struct Header {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
}

impl Header {
    fn bytes(&self) -> usize {
        let size = match self.dtype {
            "I8" | "U8" => 1,
            "F16" | "BF16" => 2,
            _ => 4,
        };
        size * self.shape.iter().product::<usize>()
    }
}

/// What goes into the file, in order: tensors whose bytes one read-back produces.
enum Item<'a> {
    /// A 16-bit matrix; `official_input_major`: the official layout is [K, M] (low-rank
    /// matrices). Written in the official layout, whatever the device's.
    Matrix16 { name: String, matrix: &'a Matrix, official_input_major: bool },
    /// A quantized matrix: its codes, then its scales.
    Quantized { name: String, matrix: &'a Matrix },
    /// Vectors of one `consts` buffer: (name, slot, shape).
    Vectors { buffer: &'a wgpu::Buffer, vectors: Vec<(String, usize, Vec<usize>)> },
    /// A host table (the embedding, DeepEmbed's s_emb), in the dtype it was loaded from.
    Table { name: String, table: &'a HostTable },
    /// DeepEmbed's s0 or s2 from its layer's f32 `consts` (s2 back to the official [r, F]).
    Deep { name: String, part: DeepPart, shape: Vec<usize>, buffer: &'a wgpu::Buffer },
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F32 => "F32",
        DType::I8 => "I8",
        DType::U8 => "U8",
    }
}

impl Item<'_> {
    fn headers(&self) -> Vec<Header> {
        let h = |name: &str, dtype: &'static str, shape: Vec<usize>| Header {
            name: name.to_string(),
            dtype,
            shape,
        };
        match self {
            Item::Matrix16 { name, matrix, official_input_major } => {
                let dtype = if matrix.format == WeightFormat::Bf16 { "BF16" } else { "F16" };
                let shape =
                    if *official_input_major { vec![matrix.k, matrix.m] } else { vec![matrix.m, matrix.k] };
                vec![h(name, dtype, shape)]
            }
            Item::Quantized { name, matrix } => {
                let (m, k) = matrix.stored();
                let codes = if matrix.format == WeightFormat::Int8 {
                    h(&format!("{name}.codes"), "I8", vec![m, k])
                } else {
                    h(&format!("{name}.codes"), "U8", vec![m, k / 2])
                };
                vec![codes, h(&format!("{name}.scales"), "F16", vec![m, k / QUANT_BLOCK])]
            }
            Item::Vectors { vectors, .. } => {
                vectors.iter().map(|(n, _, shape)| h(n, "F32", shape.clone())).collect()
            }
            Item::Table { name, table } => {
                vec![h(name, dtype_name(table.dtype), vec![table.rows, table.width])]
            }
            Item::Deep { name, shape, .. } => vec![h(name, "F32", shape.clone())],
        }
    }

    /// The bytes of this item's tensors, back to back, read from the device.
    fn bytes(&self, model: &Model) -> Result<Vec<u8>> {
        match self {
            Item::Matrix16 { matrix, official_input_major, .. } => {
                let mut out = Vec::with_capacity(matrix.m * matrix.k * 2);
                for chunk in &matrix.chunks {
                    out.extend(model.download(
                        &chunk.buffer,
                        (chunk.word_off * 4) as u64,
                        matrix.chunk_bytes(chunk),
                    )?);
                }
                if *official_input_major == (matrix.layout == Layout::InputMajor) {
                    return Ok(out);
                }
                // Stored [m, k] (rows, width), written [k, m].
                let (m, k) = matrix.stored();
                let mut t = vec![0u8; out.len()];
                for r in 0..m {
                    for c in 0..k {
                        let (src, dst) = (2 * (r * k + c), 2 * (c * m + r));
                        t[dst..dst + 2].copy_from_slice(&out[src..src + 2]);
                    }
                }
                Ok(t)
            }
            Item::Quantized { matrix, .. } => {
                let (k, format) = (matrix.stored().1, matrix.format);
                let code_bytes = format.code_words(k) * 4;
                let blocks = k / QUANT_BLOCK;
                let scale_row = blocks.div_ceil(2) * 4;
                let mut codes = Vec::with_capacity(matrix.stored().0 * code_bytes);
                let mut scales = Vec::with_capacity(matrix.stored().0 * blocks * 2);
                for chunk in &matrix.chunks {
                    let raw = model.download(
                        &chunk.buffer,
                        (chunk.word_off * 4) as u64,
                        matrix.chunk_bytes(chunk),
                    )?;
                    let (c, s) = raw.split_at(chunk.rows * code_bytes);
                    codes.extend_from_slice(c);
                    for r in 0..chunk.rows {
                        scales.extend_from_slice(&s[r * scale_row..r * scale_row + blocks * 2]);
                    }
                }
                codes.extend(scales);
                Ok(codes)
            }
            Item::Vectors { buffer, vectors } => {
                let raw = model.download(buffer, 0, buffer.size())?;
                let c = model.config.n_embd;
                let mut out = Vec::with_capacity(vectors.len() * c * 4);
                for (_, slot, _) in vectors {
                    out.extend_from_slice(&raw[slot * c * 4..(slot + 1) * c * 4]);
                }
                Ok(out)
            }
            Item::Table { table, .. } => Ok(table.bytes()?.into_owned()),
            Item::Deep { part, buffer, .. } => {
                let (f, r) = (model.config.ffn_size, model.config.deep_embed_rank);
                let raw = model.download(buffer, 0, buffer.size())?;
                let all: &[f32] = bytemuck::cast_slice(&raw);
                let values: Vec<f32> = match part {
                    DeepPart::S0 => all[deep_consts::S0..deep_consts::S0 + f].to_vec(),
                    _ => {
                        let s2t = &all[deep_consts::s2(f)..deep_consts::s2(f) + f * r];
                        (0..r).flat_map(|j| (0..f).map(move |row| s2t[row * r + j])).collect()
                    }
                };
                Ok(bytemuck::cast_slice(&values).to_vec())
            }
        }
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `official_input_major`: the official layout is [in, out] (the low-rank matrices,
/// DeepEmbed's s1).
fn matrix_item(name: String, matrix: &Matrix, official_input_major: bool) -> Item<'_> {
    if matrix.format.quantized() {
        Item::Quantized { name, matrix }
    } else {
        Item::Matrix16 { name, matrix, official_input_major }
    }
}

/// The file's tensors in schema order; neighbouring vectors of one `consts` buffer are
/// read back together.
fn items(model: &Model) -> Vec<Item<'_>> {
    let w = &model.weights;
    let mut items: Vec<Item<'_>> = Vec::new();
    let mut vectors_of: Option<(Scope, usize)> = None;
    for x in schema::expected(&model.config) {
        let group = (x.entry.scope, x.layer);
        match x.entry.role {
            Role::Embedding => items.push(Item::Table { name: x.name, table: &w.emb }),
            Role::Vector(slot) => {
                let buffer =
                    if x.entry.scope == Scope::Model { &w.consts } else { &w.layers[x.layer].consts };
                match items.last_mut() {
                    Some(Item::Vectors { vectors, .. }) if vectors_of == Some(group) => {
                        vectors.push((x.name, slot, x.shape))
                    }
                    _ => items.push(Item::Vectors { buffer, vectors: vec![(x.name, slot, x.shape)] }),
                }
                vectors_of = Some(group);
                continue;
            }
            Role::Matrix(m) => items.push(matrix_item(x.name, w.layers[x.layer].matrix(m), m.low_rank())),
            Role::Head => items.push(matrix_item(x.name, &w.head, false)),
            Role::Deep(part) => {
                let deep =
                    w.layers[x.layer].deep.as_ref().expect("a DeepEmbed model's layers have their tensors");
                items.push(match part {
                    DeepPart::Table => Item::Table { name: x.name, table: &deep.table },
                    DeepPart::EmbX => matrix_item(x.name, &deep.emb_x, false),
                    DeepPart::S1 => matrix_item(x.name, &deep.s1, true),
                    DeepPart::S0 | DeepPart::S2 => {
                        Item::Deep { name: x.name, part, shape: x.shape, buffer: &deep.consts }
                    }
                });
            }
        }
        vectors_of = None;
    }
    items
}

/// Writes `model` to `path` (see the module comment for the layout).
pub fn save(model: &Model, path: &Path) -> Result<()> {
    let items = items(model);
    let headers: Vec<Vec<Header>> = items.iter().map(|i| i.headers()).collect();
    let mut metadata = vec![
        ("format".to_string(), FORMAT.to_string()),
        ("fingerprint".to_string(), format!("{:016x}", model.weights.fingerprint)),
    ];
    for item in &items {
        if let Item::Quantized { name, matrix } = item {
            metadata.push((quant_key(name), matrix.format.name().to_string()));
            if matrix.layout == Layout::InputMajor {
                metadata.push((layout_key(name), INPUT_MAJOR.to_string()));
            }
        }
    }
    let mut json = String::from("{\"__metadata__\":{");
    json.push_str(
        &metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
            .collect::<Vec<_>>()
            .join(","),
    );
    json.push('}');
    let mut offset = 0usize;
    for h in headers.iter().flatten() {
        let shape = h.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        json.push_str(&format!(
            ",{}:{{\"dtype\":\"{}\",\"shape\":[{shape}],\"data_offsets\":[{offset},{}]}}",
            json_string(&h.name),
            h.dtype,
            offset + h.bytes()
        ));
        offset += h.bytes();
    }
    json.push('}');
    // The data starts 8-byte aligned, as the safetensors writers do (spaces pad the JSON).
    while json.len() % 8 != 0 {
        json.push(' ');
    }

    crate::atomic_file::write(path, Saving::Model, |out| {
        let io = |e| crate::atomic_file::write_error(path, Saving::Model, e);
        out.write_all(&(json.len() as u64).to_le_bytes()).map_err(io)?;
        out.write_all(json.as_bytes()).map_err(io)?;
        for (item, hs) in items.iter().zip(&headers) {
            let bytes = item.bytes(model)?;
            let expected: usize = hs.iter().map(Header::bytes).sum();
            if bytes.len() != expected {
                return Err(Error::Device(format!(
                    "saving {}: read {} bytes back, expected {expected}",
                    hs[0].name,
                    bytes.len()
                )));
            }
            out.write_all(&bytes).map_err(io)?;
        }
        Ok(())
    })
}
