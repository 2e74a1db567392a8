//! Interrupting long calls. A call that runs in several submissions (a prefill of many
//! chunks, a batch over several state pages, a load) asks its `Interrupt` between them;
//! the Python binding's asks for pending signals (Ctrl-C), an embedding application's
//! may read a cancel flag set from another thread. A call that stops this way leaves the
//! states it was given as they were before it (see `Model::forward_batch_with`).

use crate::error::{Error, Result};

#[derive(Clone, Copy)]
pub struct Interrupt<'a> {
    check: Option<&'a dyn Fn() -> bool>,
}

impl<'a> Interrupt<'a> {
    /// Never interrupts: the call runs to its end.
    pub const NONE: Interrupt<'static> = Interrupt { check: None };

    /// Interrupts when `check` returns true.
    pub fn new(check: &'a dyn Fn() -> bool) -> Interrupt<'a> {
        Interrupt { check: Some(check) }
    }

    /// Whether anything can interrupt (a call then waits for each submission, so that
    /// the next check comes when the work before it is done, not when it was queued).
    pub fn active(&self) -> bool {
        self.check.is_some()
    }

    /// `Err(Error::Interrupted)` once the check says so.
    pub fn check(&self) -> Result<()> {
        match self.check {
            Some(f) if f() => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }
}
