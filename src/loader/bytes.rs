//! A checkpoint's bytes: a read-only mapping of its file, or bytes in memory (files made
//! on the fly, and the fuzz targets, which hand the readers arbitrary bytes).

use std::path::Path;

use crate::error::{Error, Result};

pub enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    pub fn map(path: &Path) -> Result<FileBytes> {
        // Checked before opening too: opening a FIFO (a named pipe, say in an unpacked
        // archive) blocks until something writes to it.
        if !std::fs::metadata(path).map_err(|e| Error::io(path, e))?.is_file() {
            return Err(Error::load(path, "not a regular file"));
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::load(path, "not a regular file"));
        }
        // SAFETY: the mapping is read-only. As with any mmap-based loader, we rely on the
        // file not being truncated or rewritten by another process while it is open: a
        // changed file gives wrong weights, not unsoundness in code that only copies the
        // bytes out (a truncated one can fault on access, as for every mmap reader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(FileBytes::Mapped(map))
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}
