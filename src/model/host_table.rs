//! Tables that stay in host memory: the embedding and RWKV-7a's per-layer DeepEmbed
//! tables. A call needs only the rows of the tokens it feeds, so the device never holds
//! them. Where the checkpoint hands out its bytes without copying (a memory-mapped
//! safetensors file, a contiguous `.pth` tensor), the table reads them from the mapping:
//! only the rows used are ever paged in. Otherwise (a random model, a strided view) the
//! table holds its own copy.

use std::borrow::Cow;
use std::sync::Arc;

use super::weights::to_f32_into;
use crate::error::{Error, Result};
use crate::loader::{Checkpoint, DType};

enum Bytes {
    Mapped { ck: Arc<dyn Checkpoint>, name: String },
    Owned(Vec<u8>),
}

pub struct HostTable {
    pub rows: usize,
    pub width: usize,
    pub dtype: DType,
    bytes: Bytes,
}

impl HostTable {
    /// The table `name` [rows, width] of `ck`, checked: its size, and every value finite.
    pub fn load(ck: &Arc<dyn Checkpoint>, name: &str, rows: usize, width: usize) -> Result<HostTable> {
        let info = ck.info(name).ok_or_else(|| Error::load(ck.path(), format!("missing tensor {name:?}")))?;
        let want = rows * width * info.dtype.size();
        let data = ck.read(name)?;
        if data.len() != want {
            return Err(Error::load(
                ck.path(),
                format!("{name} holds {} bytes; expected {want}", data.len()),
            ));
        }
        let mut row = Vec::with_capacity(width);
        for (r, chunk) in data.chunks_exact(width * info.dtype.size()).enumerate() {
            row.clear();
            to_f32_into(chunk, info.dtype, &mut row);
            if let Some(at) = row.iter().position(|v| !v.is_finite()) {
                return Err(super::load::non_finite(ck.as_ref(), name, &info.shape, r * width + at, row[at]));
            }
        }
        let bytes = match data {
            Cow::Borrowed(_) => Bytes::Mapped { ck: ck.clone(), name: name.to_string() },
            Cow::Owned(owned) => Bytes::Owned(owned),
        };
        Ok(HostTable { rows, width, dtype: info.dtype, bytes })
    }

    /// The whole table in its file dtype.
    pub fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        match &self.bytes {
            Bytes::Mapped { ck, name } => ck.read(name),
            Bytes::Owned(v) => Ok(Cow::Borrowed(v)),
        }
    }

    /// Appends the rows `ids` as f32 (exact for every dtype) to `out`.
    pub fn rows_into(&self, ids: impl IntoIterator<Item = u32>, out: &mut Vec<f32>) -> Result<()> {
        let bytes = self.bytes()?;
        let row = self.width * self.dtype.size();
        for id in ids {
            let at = id as usize * row;
            to_f32_into(&bytes[at..at + row], self.dtype, out);
        }
        Ok(())
    }

    pub fn size_bytes(&self) -> u64 {
        (self.rows * self.width * self.dtype.size()) as u64
    }

    /// Read from the checkpoint's mapping rather than copied.
    pub fn mapped(&self) -> bool {
        matches!(self.bytes, Bytes::Mapped { .. })
    }
}
