//! Host buffers whose size comes from the caller (a long input's logits, a checkpoint's
//! tensors): allocated fallibly, so that too large a request is an `OutOfMemory` error
//! naming what it was for, never an abort of the whole process.

use crate::error::{Error, Result};

pub fn host_oom(bytes: usize, what: &str) -> Error {
    Error::OutOfMemory(format!("host memory: {bytes} bytes for {what} could not be allocated"))
}

/// Reserves room for `n` more f32 values.
pub fn reserve_f32(values: &mut Vec<f32>, n: usize, what: &str) -> Result<()> {
    values.try_reserve(n).map_err(|_| host_oom(n.saturating_mul(4), what))
}

/// `n` zeros.
pub fn zeroed_f32(n: usize, what: &str) -> Result<Vec<f32>> {
    let mut values = Vec::new();
    values.try_reserve_exact(n).map_err(|_| host_oom(n.saturating_mul(4), what))?;
    values.resize(n, 0.0);
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_large_is_an_error_naming_it() {
        let Err(Error::OutOfMemory(message)) = zeroed_f32(usize::MAX / 2, "the logits") else {
            panic!("allocated usize::MAX / 2 floats")
        };
        assert!(message.contains("the logits"), "{message}");
        assert_eq!(zeroed_f32(3, "x").unwrap(), vec![0.0; 3]);
        let mut v = vec![1.0];
        assert!(matches!(reserve_f32(&mut v, usize::MAX / 2, "y"), Err(Error::OutOfMemory(_))));
        assert_eq!(v, vec![1.0]);
    }
}
