//! Files written whole or not at all: the bytes go to a temporary file beside the target,
//! are synced, and the temporary is renamed over the target. A full disk or a failed
//! write leaves an existing file at the target exactly as it was, and no partial file.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, Saving};

/// The hidden temporary name beside `path`.
fn temporary(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes `path` through `body`, which gets a buffered writer over the temporary file.
/// Errors from `body` other than I/O pass through unchanged.
pub fn write(path: &Path, what: Saving, body: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let tmp = temporary(path);
    let io = |e: std::io::Error| Error::Write { path: path.to_path_buf(), what, source: e };
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
        body(&mut out)?;
        out.flush().map_err(io)?;
        out.get_ref().sync_all().map_err(io)?;
        drop(out);
        std::fs::rename(&tmp, path).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The error for a failed write inside a `write` body.
pub fn write_error(path: &Path, what: Saving, source: std::io::Error) -> Error {
    Error::Write { path: path.to_path_buf(), what, source }
}
