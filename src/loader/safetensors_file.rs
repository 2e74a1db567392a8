//! `.safetensors` / `.st` checkpoints, memory-mapped: a tensor's bytes are borrowed from
//! the mapping, so only the tensor being uploaded is ever touched.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::bytes::FileBytes;
use super::{Checkpoint, DType, TensorInfo};
use crate::error::{Error, Result};

pub struct SafetensorsFile {
    path: PathBuf,
    map: FileBytes,
    /// name -> (info, byte range in the mapping), in file order.
    tensors: Vec<(String, TensorInfo, std::ops::Range<usize>)>,
    index: HashMap<String, usize>,
    pub metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        Self::from_bytes(path, FileBytes::map(path)?)
    }

    /// `bytes` read as the file at `path` (the path names it in errors).
    pub fn from_bytes(path: &Path, map: FileBytes) -> Result<SafetensorsFile> {
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| Error::load(path, format!("not a valid safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = Vec::new();
        let mut ordered: Vec<(String, &safetensors::tensor::TensorInfo)> =
            meta.tensors().into_iter().collect();
        ordered.sort_by_key(|(_, info)| info.data_offsets.0);
        for (name, info) in ordered {
            let dtype = match info.dtype {
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::I8 => DType::I8,
                safetensors::Dtype::U8 => DType::U8,
                other => {
                    return Err(Error::load(
                        path,
                        format!(
                        "tensor {name:?} has dtype {other:?}; only F16, BF16, F32 (and I8/U8 codes) are read"
                    ),
                    ))
                }
            };
            let range = data_start + info.data_offsets.0..data_start + info.data_offsets.1;
            tensors.push((name, TensorInfo { dtype, shape: info.shape.clone() }, range));
        }
        let index = tensors.iter().enumerate().map(|(i, (n, _, _))| (n.clone(), i)).collect();
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile { path: path.to_path_buf(), map, tensors, index, metadata })
    }
}

impl Checkpoint for SafetensorsFile {
    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|(n, _, _)| n.clone()).collect()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.index.get(name).map(|&i| self.tensors[i].1.clone())
    }
    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::load(&self.path, format!("missing tensor {name:?}")))?;
        Ok(Cow::Borrowed(&self.map[self.tensors[i].2.clone()]))
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn metadata(&self, key: &str) -> Option<String> {
        self.metadata.get(key).cloned()
    }
}
