//! Checkpoint readers. Each format yields the same thing: named tensors with a
//! dtype and shape, read one at a time as contiguous little-endian row-major bytes,
//! so that host memory stays bounded by the largest tensor.

pub mod bytes;
pub mod fla;
pub mod folder;
pub mod pth;
pub mod safetensors_file;

use std::borrow::Cow;
use std::path::Path;

use crate::error::{Error, Result};

/// Element types found in RWKV checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F16,
    BF16,
    F32,
    /// Quantized codes in files this library saved (int8 codes; nf4 codes two per byte).
    I8,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A checkpoint opened for reading.
pub trait Checkpoint: Send + Sync {
    /// Tensor names, in file order.
    fn names(&self) -> Vec<String>;
    fn info(&self, name: &str) -> Option<TensorInfo>;
    /// The tensor's elements, contiguous, row-major, little-endian: borrowed from the
    /// mapped file where the layout allows, copied otherwise.
    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>>;
    fn path(&self) -> &Path;
    /// A value of the file's metadata (safetensors `__metadata__`), if it has one.
    fn metadata(&self, _key: &str) -> Option<String> {
        None
    }
    /// Dimensions the file states apart from its tensors (a Hugging Face config.json),
    /// which the schema cross-checks.
    fn declared(&self) -> Vec<crate::schema::Declared> {
        Vec::new()
    }
    /// Whether the layout fixes the orientation of the low-rank matrices (`Some(true)`:
    /// [out, in]); `None`: told from their shapes.
    fn low_rank_out_in(&self) -> Option<bool> {
        None
    }
}

/// Opens a checkpoint under the official tensor names: a `.pth` (PyTorch zip) or
/// `.safetensors`/`.st` file told by content, not by extension, or a Hugging Face folder
/// (`config.json` with `model.safetensors` or sharded files and their index). Files in
/// fla's layout are renamed (`fla::FlaView`).
pub fn open(path: &Path) -> Result<Box<dyn Checkpoint>> {
    let ck = if path.is_dir() { folder::open(path)? } else { open_file(path)? };
    if fla::is_fla(&ck.names()) {
        let config = folder::config_json_for(path)?;
        return Ok(Box::new(fla::FlaView::new(ck, config)?));
    }
    Ok(ck)
}

/// One checkpoint file, by content.
pub fn open_file(path: &Path) -> Result<Box<dyn Checkpoint>> {
    from_bytes(path, bytes::FileBytes::map(path)?)
}

/// A checkpoint from its bytes, told by content (`path` names it in errors).
pub fn from_bytes(path: &Path, data: bytes::FileBytes) -> Result<Box<dyn Checkpoint>> {
    if data.len() < 8 {
        return Err(Error::load(
            path,
            format!("file is {} bytes long: too short to be a checkpoint", data.len()),
        ));
    }
    let magic: [u8; 8] = data[..8].try_into().expect("8 bytes");
    if &magic[..4] == b"GGUF" {
        return Err(Error::load(path, "a GGUF file (llama.cpp's format), which this version does not read: load the model's .pth or .safetensors release"));
    }
    if &magic[..4] == b"PK\x03\x04" {
        Ok(Box::new(pth::PthFile::from_bytes(path, data)?))
    } else if u64::from_le_bytes(magic) < (100 << 20) {
        Ok(Box::new(safetensors_file::SafetensorsFile::from_bytes(path, data)?))
    } else {
        Err(Error::load(
            path,
            "not a checkpoint this library reads: expected a PyTorch .pth (zip) or a .safetensors file",
        ))
    }
}
