//! `Int`: a Python int of any size. PyO3's fixed-width conversions raise a bare
//! OverflowError that names no option for -5 as a `usize` or 2**63 as an `i64`; taking
//! `Int` lets the range checks name the option and show the value as given.

use pyo3::prelude::*;
use pyo3::types::PyInt;

/// The value, exact within i128 and saturated beyond (where any check fails anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Int(pub i128);

impl FromPyObject<'_, '_> for Int {
    type Error = PyErr;

    fn extract(obj: Borrowed<'_, '_, PyAny>) -> PyResult<Int> {
        if let Ok(v) = obj.extract::<i64>() {
            return Ok(Int(v as i128));
        }
        // Beyond i64 (or a NumPy integer): by its decimal text. operator.index refuses
        // floats and text with a TypeError (PyO3 adds the argument's name).
        let index = obj.py().import("operator")?.call_method1("index", (obj,))?.cast_into::<PyInt>()?;
        let text = index.str()?.to_string();
        Ok(Int(text.parse::<i128>().unwrap_or(if text.starts_with('-') { i128::MIN } else { i128::MAX })))
    }
}

impl std::fmt::Display for Int {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Int {
    /// The value as `T` when `min <= value <= T::MAX`, else an `InvalidOptionError`
    /// naming `what`.
    pub(crate) fn within<T: TryFrom<i128> + Into<i128> + Copy + std::fmt::Display>(
        self,
        what: &str,
        min: T,
        max: T,
    ) -> PyResult<T> {
        if self.0 < 0 && min.into() == 0 {
            return Err(super::errors::invalid(format!("{what} must not be negative, got {}", self.0)));
        }
        if self.0 < min.into() || self.0 > max.into() {
            return Err(super::errors::invalid(format!(
                "{what} must be between {min} and {max}, got {}",
                self.0
            )));
        }
        T::try_from(self.0).map_err(|_| super::errors::invalid(format!("{what} is out of range: {}", self.0)))
    }

    pub(crate) fn count(self, what: &str) -> PyResult<usize> {
        self.within::<u64>(what, 0, u64::MAX).map(|v| v as usize)
    }
}
