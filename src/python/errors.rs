//! `Error` to Python exceptions. The classes are declared in Python
//! (`python/rwkv_gpu/errors.py`), so that each can also subclass the built-in exception it
//! means (ShapeError is a ValueError, a missing file a FileNotFoundError, ...), which a
//! class made by PyO3 cannot; this file only picks the class.

use pyo3::prelude::*;
use pyo3::types::PyType;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Saving};
use crate::interrupt::Interrupt;

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    Ok(py.import("rwkv_gpu.errors")?.getattr(name)?.cast_into::<PyType>()?)
}

/// The exception for `e`: its class, its message, and for I/O failures the OS error as
/// `__cause__` (and errno / filename on the exception itself, as OSError has them).
pub(crate) fn to_py(e: Error) -> PyErr {
    Python::attach(|py| {
        let msg = e.to_string();
        let (name, io) = match &e {
            Error::Device(_) => ("DeviceError", None),
            Error::DeviceLost(_) => ("DeviceLostError", None),
            Error::OutOfMemory(_) => ("OutOfMemoryError", None),
            Error::Shader { .. } => ("ShaderError", None),
            Error::Io { source, path } => match source.kind() {
                std::io::ErrorKind::NotFound => ("ModelNotFoundError", Some((source, path))),
                std::io::ErrorKind::PermissionDenied => ("ModelPermissionError", Some((source, path))),
                _ => ("ModelLoadError", Some((source, path))),
            },
            Error::Load { .. } => ("ModelLoadError", None),
            Error::Write { what: Saving::State, source, path } => ("StateSaveError", Some((source, path))),
            Error::Write { what: Saving::Model | Saving::Cache, source, path } => {
                ("ModelSaveError", Some((source, path)))
            }
            Error::Shape(_) => ("ShapeError", None),
            Error::State(_) => ("StateError", None),
            Error::Invalid(_) => ("InvalidOptionError", None),
            // Raised by `long_call` with the signal handler's exception; this is a fallback.
            Error::Interrupted => return pyo3::exceptions::PyKeyboardInterrupt::new_err("interrupted"),
        };
        let made = || -> PyResult<PyErr> {
            let cls = class(py, name)?;
            let err = match io {
                // OSError(errno, strerror, filename): str() is "[Errno 2] <msg>: '<path>'".
                Some((source, path)) if source.raw_os_error().is_some() => {
                    // The OS's words without Rust's "(os error N)": errno is on the exception.
                    let text = source.to_string();
                    let mut text = text.split(" (os error").next().unwrap_or(&text).to_string();
                    if let Error::Write { what, .. } = &e {
                        text = format!("could not write the {what}: {text}");
                    }
                    PyErr::from_value(cls.call1((source.raw_os_error(), text, path.display().to_string()))?)
                }
                _ => PyErr::from_value(cls.call1((msg.clone(),))?),
            };
            if let Some((source, _)) = io {
                let cause = PyErr::new::<pyo3::exceptions::PyOSError, _>(source.to_string());
                err.set_cause(py, Some(cause));
            }
            Ok(err)
        };
        // Only if rwkv_gpu.errors itself cannot be imported (a broken install).
        made().unwrap_or_else(|import_error| import_error)
    })
}

pub(crate) fn shape(msg: impl Into<String>) -> PyErr {
    to_py(Error::Shape(msg.into()))
}

pub(crate) fn invalid(msg: impl Into<String>) -> PyErr {
    to_py(Error::Invalid(msg.into()))
}

/// A Python exception raised while a long call runs (a signal handler's, a callback's),
/// kept to be raised when the call returns.
#[derive(Default)]
pub(crate) struct Caught(Mutex<Option<PyErr>>);

impl Caught {
    /// Keeps `e` (the first one wins) and gives the error that stops the core call.
    pub(crate) fn stop(&self, e: PyErr) -> Error {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        Error::Interrupted
    }
}

/// Runs a long core call with the GIL released, letting it ask between its submissions
/// whether a signal is pending (Ctrl-C: the signal handler runs there, on the main
/// thread). The handler's exception (KeyboardInterrupt), or one a callback raised into
/// `Caught`, is what the call then raises. Every call that can take more than one
/// submission goes through here.
///
/// Only the main thread asks: Python runs signal handlers nowhere else, and a thread that
/// takes the GIL back in the middle of a call can meet a Python thread waiting (GIL held)
/// for a lock the call holds, or an interpreter shutting down (a daemon thread's call at
/// exit, where taking the GIL ends the thread under Rust frames).
pub(crate) fn long_call<T: Send>(
    py: Python<'_>,
    f: impl FnOnce(Interrupt, &Caught) -> crate::Result<T> + Send,
) -> PyResult<T> {
    let caught = Caught::default();
    let threading = py.import("threading")?;
    let on_main_thread =
        threading.call_method0("current_thread")?.is(&threading.call_method0("main_thread")?);
    let pending = || {
        Python::attach(|py| match py.check_signals() {
            Ok(()) => false,
            Err(e) => {
                caught.stop(e);
                true
            }
        })
    };
    let result =
        counted(py, || f(if on_main_thread { Interrupt::new(&pending) } else { Interrupt::NONE }, &caught))?;
    match result {
        Ok(v) => Ok(v),
        Err(Error::Interrupted) => {
            let raised = caught.0.into_inner().unwrap_or_else(|p| p.into_inner());
            Err(raised.unwrap_or_else(|| pyo3::exceptions::PyKeyboardInterrupt::new_err("interrupted")))
        }
        Err(e) => Err(to_py(e)),
    }
}

// ---- the interpreter's exit ----
//
// A thread that takes the GIL back while the interpreter finalizes is ended on the spot
// (pthread_exit unwinding through Rust frames: a crash). Daemon threads (an Engine's
// scheduler, a user's) may be inside a call when the main thread exits, so an atexit
// hook (`at_exit`, registered when `_core` is imported) refuses new calls and waits for
// those inside to come back out before finalization begins.

static EXITING: AtomicBool = AtomicBool::new(false);
static INSIDE: AtomicUsize = AtomicUsize::new(0);

/// Leaves the count once the call has the GIL again.
struct Inside;

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `f` with the GIL released, counted for `at_exit`; refused once the interpreter
/// is exiting.
fn counted<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    INSIDE.fetch_add(1, Ordering::SeqCst);
    let _inside = Inside;
    if EXITING.load(Ordering::SeqCst) {
        return Err(to_py(Error::State("the interpreter is exiting: no more calls into the runtime".into())));
    }
    Ok(py.detach(f))
}

/// A core call with the GIL released (every one goes through here or `long_call`).
pub(crate) fn detach<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::Result<T> + Send) -> PyResult<T> {
    counted(py, f)?.map_err(to_py)
}

/// Most seconds `at_exit` waits for calls to come back (a long prefill on a CPU driver
/// may take minutes: the exit then goes on without it).
const EXIT_WAIT_S: u64 = 10;

/// The atexit hook: no new calls, and the calls inside given time to come back.
#[pyfunction]
pub(crate) fn at_exit(py: Python<'_>) {
    EXITING.store(true, Ordering::SeqCst);
    py.detach(|| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(EXIT_WAIT_S);
        while INSIDE.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    });
}
