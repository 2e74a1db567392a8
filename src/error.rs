//! The one error type of the core. The Python layer maps each variant to an
//! exception class (see `src/python/errors.rs`); messages carry the values that were wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter matches the request, or the device could not be created.
    #[error("{0}")]
    Device(String),

    /// The device was lost (driver reset, removal, hang); the model must be opened again.
    #[error("{0}")]
    DeviceLost(String),

    /// The device (or, while loading, the host) ran out of memory for an allocation.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),

    /// A WGSL kernel failed to compile or validate: names the kernel and its variant.
    #[error("shader `{kernel}` failed to compile: {message}")]
    Shader { kernel: String, message: String },

    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A model or state file could not be written (the target is left as it was).
    #[error("{path}: could not write the {what}: {source}")]
    Write {
        path: PathBuf,
        what: Saving,
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint or state file is malformed, truncated, foreign or unsupported.
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },

    /// A tensor, token list or state has the wrong shape, size or range.
    #[error("{0}")]
    Shape(String),

    /// A state was used by two threads at once, or with a model it does not belong to.
    #[error("{0}")]
    State(String),

    /// The call was interrupted (Ctrl-C, a cancel flag) between two of its submissions;
    /// the states it was given are as they were before it.
    #[error("interrupted")]
    Interrupted,

    /// Anything else that is the caller's fault (bad option value and the like).
    #[error("{0}")]
    Invalid(String),
}

/// What a failed write was saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saving {
    Model,
    State,
    /// The pipeline cache (never reported: a cache that cannot be written is skipped).
    Cache,
}

impl std::fmt::Display for Saving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Saving::Model => "model",
            Saving::State => "state",
            Saving::Cache => "pipeline cache",
        })
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn load(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Load { path: path.into(), message: message.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// This error, met while putting a failed call's states back (after `cause`): the
    /// same kind, its message naming both, since the states are now not as they were.
    pub fn after_failed_call(self, cause: &Error) -> Self {
        let note = |m: String| format!("{m} (while putting the states back after the call failed: {cause})");
        match self {
            Error::Device(m) => Error::Device(note(m)),
            Error::DeviceLost(m) => Error::DeviceLost(note(m)),
            Error::OutOfMemory(m) => Error::OutOfMemory(note(m)),
            Error::State(m) => Error::State(note(m)),
            other => other,
        }
    }

    /// The one wording of a token id that a vocabulary of `vocab` tokens does not hold, for
    /// the model and the tokenizer alike (and for ids the binding cannot even represent as
    /// u32: negative, or huge). `position` is the id's index in its list, when it has one.
    pub fn token_out_of_range(token: impl std::fmt::Display, position: Option<usize>, vocab: usize) -> Self {
        let at = position.map(|p| format!(" at position {p}")).unwrap_or_default();
        Error::Shape(format!("token id {token}{at} is out of range: the vocabulary has {vocab} tokens"))
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn a_failed_restore_names_the_failure_before_it() {
        let restored =
            Error::OutOfMemory("no room for a state copy".into()).after_failed_call(&Error::Interrupted);
        assert!(matches!(restored, Error::OutOfMemory(_)));
        let text = restored.to_string();
        assert!(
            text.contains("no room for a state copy") && text.contains("after the call failed: interrupted"),
            "{text}"
        );
        let lost =
            Error::DeviceLost("gone".into()).after_failed_call(&Error::Device("a submission failed".into()));
        assert!(matches!(&lost, Error::DeviceLost(m) if m.contains("a submission failed")));
    }
}
