//! A checkpoint's bytes: a read-only mapping of its file, or bytes in memory (files made
//! on the fly, and the fuzz targets, which hand the readers arbitrary bytes).

use std::path::Path;

use crate::error::{Error, Result};

pub enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// The metadata of `path`, refusing anything but a regular file. Checked before opening:
/// opening a FIFO (a named pipe, say in an unpacked archive) blocks until something
/// writes to it.
pub fn regular_file(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::load(path, "not a regular file"));
    }
    Ok(meta)
}

/// The whole of a small side file (JSON, a vocabulary), refused unread when it is not a
/// regular file or is bigger than `max_bytes` (`what` names the kind in that message).
pub fn read_small(path: &Path, max_bytes: u64, what: &str) -> Result<Vec<u8>> {
    let len = regular_file(path)?.len();
    if len > max_bytes {
        return Err(Error::load(path, format!("{len} bytes: too big for {what} (at most {max_bytes})")));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

impl FileBytes {
    pub fn map(path: &Path) -> Result<FileBytes> {
        regular_file(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_small_refuses_what_is_not_a_small_regular_file() {
        let dir = std::env::temp_dir().join(format!("rwkv-gpu-read-small-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("side.json");
        std::fs::write(&file, b"12345678").unwrap();
        assert_eq!(read_small(&file, 8, "a test file").unwrap(), b"12345678");
        let big = read_small(&file, 7, "a test file").unwrap_err().to_string();
        assert!(big.ends_with("side.json: 8 bytes: too big for a test file (at most 7)"), "{big}");
        let folder = read_small(&dir, 1 << 20, "a test file").unwrap_err().to_string();
        assert!(folder.ends_with("not a regular file"), "{folder}");
        #[cfg(unix)]
        {
            // Reading a FIFO would block this test forever; it must be refused unopened.
            let pipe = dir.join("pipe");
            assert!(std::process::Command::new("mkfifo").arg(&pipe).status().unwrap().success());
            let fifo = read_small(&pipe, 1 << 20, "a test file").unwrap_err().to_string();
            assert!(fifo.ends_with("pipe: not a regular file"), "{fifo}");
            assert!(FileBytes::map(&pipe).is_err());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
