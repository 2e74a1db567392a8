//! The driver's compiled pipelines kept on disk between runs (wgpu's pipeline cache,
//! Vulkan only), so that a desktop app's second start skips shader compilation.
//!
//! One file per adapter and driver (`wgpu::util::pipeline_cache_key`) in
//! `RWKV_GPU_CACHE_DIR`, else `$XDG_CACHE_HOME/rwkv-gpu`, else `~/.cache/rwkv-gpu`
//! (`RWKV_GPU_CACHE_DIR=off` turns it off). wgpu checks only a header of the data it is
//! handed, so the file wraps it in an envelope of our own (magic, length, FNV-1a hash): a
//! truncated, corrupt or foreign file is ignored, never given to the driver. Written
//! atomically (`atomic_file`) whenever new pipelines were compiled since the last write.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::Saving;

const MAGIC: &[u8; 8] = b"RWKVPLC1";
/// A cache bigger than this is not one of ours.
const MAX_BYTES: u64 = 512 << 20;

pub struct DiskCache {
    pub cache: wgpu::PipelineCache,
    path: PathBuf,
    dirty: AtomicBool,
}

/// Where caches go, or None when turned off or no home is known.
pub(crate) fn cache_directory() -> Option<PathBuf> {
    match std::env::var_os("RWKV_GPU_CACHE_DIR") {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
            Some(base.join("rwkv-gpu"))
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The cached data inside `file`, if the envelope is whole and its hash matches.
fn unwrap(file: &[u8]) -> Option<&[u8]> {
    let rest = file.strip_prefix(MAGIC)?;
    let (len, rest) = rest.split_first_chunk::<8>()?;
    let (hash, data) = rest.split_first_chunk::<8>()?;
    (data.len() as u64 == u64::from_le_bytes(*len) && fnv1a(data) == u64::from_le_bytes(*hash))
        .then_some(data)
}

fn wrap(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a(data).to_le_bytes());
    out.extend_from_slice(data);
    out
}

impl DiskCache {
    /// The cache for this adapter, primed from its file when that is valid; None where
    /// the backend has no pipeline cache or caching is off.
    pub fn open(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Option<DiskCache> {
        let key = wgpu::util::pipeline_cache_key(info)?;
        let path = cache_directory()?.join(key);
        let file = std::fs::metadata(&path)
            .ok()
            .filter(|m| m.is_file() && m.len() <= MAX_BYTES) // a FIFO would block the read
            .and_then(|_| std::fs::read(&path).ok());
        let data = file.as_deref().and_then(unwrap);
        // SAFETY: `data` is what `get_data` returned on an earlier run for an adapter of
        // the same key: our envelope's hash says these are exactly the bytes written.
        // `fallback` makes wgpu start empty if the driver refuses them.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("rwkv-gpu pipelines"),
                data,
                fallback: true,
            })
        };
        Some(DiskCache { cache, path, dirty: AtomicBool::new(false) })
    }

    /// A pipeline was compiled through the cache.
    pub fn mark(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Writes the cache if pipelines were compiled since the last write. Failing to write
    /// a cache is not an error of the call that triggered it: the next run compiles again.
    pub fn persist(&self) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let Some(data) = self.cache.get_data() else { return };
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = crate::atomic_file::write_own(&self.path, Saving::Cache, |out| {
            out.write_all(&wrap(&data))
                .map_err(|e| crate::atomic_file::write_error(&self.path, Saving::Cache, e))
        });
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_refuses_damage() {
        let data = b"driver bytes".to_vec();
        let file = wrap(&data);
        assert_eq!(unwrap(&file), Some(&data[..]));
        for cut in 0..file.len() {
            assert_eq!(unwrap(&file[..cut]), None, "truncated to {cut}");
        }
        let mut bad = file.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(unwrap(&bad), None);
        assert_eq!(unwrap(b"WGPUPLCH and anything"), None);
    }
}
