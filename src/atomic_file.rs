//! Files written whole or not at all: the bytes go to a temporary file beside the target,
//! are synced, and the temporary is renamed over the target. A full disk or a failed
//! write leaves an existing file at the target exactly as it was, and no partial file.
//!
//! Each write has its own temporary (two threads saving to one path must not share one),
//! with a short name of its own (a target name near the file system's limit still gets
//! one). The target is a regular file or nothing: renaming over a device, a FIFO or a
//! folder would replace it (`/dev/null` among them), so such a target is refused. A link
//! is followed: the file it points to is replaced and the link stays.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result, Saving};

/// The file to replace: `path`, or where its links lead.
fn target(path: &Path) -> std::io::Result<PathBuf> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => std::fs::canonicalize(path),
        Ok(_) => Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a regular file (a folder, device or pipe): refusing to replace it",
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(path.to_path_buf()),
        Err(e) => Err(e),
    }
}

/// A new hidden file beside `target`, created by this call only.
fn temporary(target: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = target.with_file_name(format!(".rwkv-gpu-{}-{n}.partial", std::process::id()));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue, // left by a crashed process
            Err(e) => return Err(e),
        }
    }
}

/// Writes `path` through `body`, which gets a buffered writer over the temporary file.
/// Errors from `body` other than I/O pass through unchanged.
pub fn write(path: &Path, what: Saving, body: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let io = |e: std::io::Error| Error::Write { path: path.to_path_buf(), what, source: e };
    let target = target(path).map_err(io)?;
    let (tmp, file) = temporary(&target).map_err(io)?;
    let result = (|| -> Result<()> {
        let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
        body(&mut out)?;
        out.flush().map_err(io)?;
        out.get_ref().sync_all().map_err(io)?;
        drop(out);
        std::fs::rename(&tmp, &target).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `write` for the runtime's own files (its caches): whatever else is in the file's place
/// (a FIFO) goes first, where a save to a path the caller names refuses to replace it.
pub fn write_own(path: &Path, what: Saving, body: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        let _ = std::fs::remove_file(path);
    }
    write(path, what, body)
}

/// The error for a failed write inside a `write` body.
pub fn write_error(path: &Path, what: Saving, source: std::io::Error) -> Error {
    Error::Write { path: path.to_path_buf(), what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rwkv-gpu-atomic-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn put(path: &Path, text: &'static str) -> Result<()> {
        write(path, Saving::State, |out| {
            out.write_all(text.as_bytes()).map_err(|e| write_error(path, Saving::State, e))
        })
    }

    /// Threads saving to one path each write whole files: the file is always one of
    /// theirs, never a mix or a stub, and no save fails for another's temporary.
    #[test]
    fn saves_racing_to_one_path_each_write_a_whole_file() {
        let dir = scratch_dir("race");
        let path = dir.join("state.st");
        let texts: [&'static str; 2] = ["a".repeat(50_000).leak(), "b".repeat(70_000).leak()];
        std::thread::scope(|scope| {
            for text in texts {
                let path = &path;
                scope.spawn(move || (0..50).for_each(|_| put(path, text).unwrap()));
            }
        });
        let got = std::fs::read_to_string(&path).unwrap();
        assert!(texts.contains(&got.as_str()));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temporaries left behind");
    }

    #[test]
    fn a_name_at_the_length_limit_and_links_are_saved_through() {
        let dir = scratch_dir("names");
        let long = dir.join("x".repeat(250));
        put(&long, "long").unwrap();
        assert_eq!(std::fs::read_to_string(&long).unwrap(), "long");
        #[cfg(unix)]
        {
            let link = dir.join("link");
            std::os::unix::fs::symlink(&long, &link).unwrap();
            put(&link, "through").unwrap();
            assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
            assert_eq!(std::fs::read_to_string(&long).unwrap(), "through");
        }
    }

    #[test]
    fn a_folder_or_device_is_not_replaced() {
        let dir = scratch_dir("special");
        let Err(Error::Write { source, .. }) = put(&dir, "x") else { panic!("replaced a folder") };
        assert!(source.to_string().contains("not a regular file"), "{source}");
        assert!(dir.is_dir());
        #[cfg(unix)]
        {
            let null = Path::new("/dev/null");
            assert!(put(null, "x").is_err());
            assert!(!std::fs::metadata(null).unwrap().is_file());
        }
    }
}
