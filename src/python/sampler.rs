//! Python bindings of the sampler (src/sampler.rs). Logits cross as little-endian f32
//! bytes (`np.ndarray.tobytes()`), so no array library is needed on this side.

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::int::Int;
use super::to_py;
use crate::sampler::{Sampler, SamplingOptions};

#[pyclass(name = "Sampler", module = "rwkv_gpu._core", frozen)]
pub struct PySampler {
    pub(crate) inner: Arc<Mutex<Sampler>>,
}

impl PySampler {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Sampler> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn logits(&self, raw: &[u8]) -> PyResult<Vec<f32>> {
        self.lock().logits_from_le_bytes(raw).map_err(to_py)
    }
}

/// The core's sampling defaults (the official RWKV-7 chat demo's), which
/// `rwkv_gpu.Sampling` takes as its own.
#[pyfunction]
pub(crate) fn sampling_defaults(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let d = SamplingOptions::default();
    let out = pyo3::types::PyDict::new(py);
    out.set_item("temperature", d.temperature)?;
    out.set_item("top_p", d.top_p)?;
    out.set_item("top_k", d.top_k)?;
    out.set_item("presence_penalty", d.presence_penalty)?;
    out.set_item("frequency_penalty", d.frequency_penalty)?;
    out.set_item("penalty_decay", d.penalty_decay)?;
    out.set_item("banned_tokens", d.banned)?;
    Ok(out)
}

#[pymethods]
impl PySampler {
    #[new]
    // No defaults here: `rwkv_gpu.Sampling` passes every option, with the core's
    // defaults (`sampling_defaults`).
    #[pyo3(signature = (vocab_size, *, temperature, top_p, top_k, presence_penalty, frequency_penalty, penalty_decay, banned,
                        logit_bias, seed))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        vocab_size: Int,
        temperature: f32,
        top_p: f32,
        top_k: Int,
        presence_penalty: f32,
        frequency_penalty: f32,
        penalty_decay: f32,
        banned: Vec<Int>,
        logit_bias: Vec<(Int, f32)>,
        seed: Option<Int>,
    ) -> PyResult<Self> {
        let token = |t: Int, what: &str| t.within::<u32>(what, 0, u32::MAX);
        let top_k = top_k.count("top_k")?;
        let banned =
            banned.into_iter().map(|t| token(t, "a banned token")).collect::<PyResult<Vec<u32>>>()?;
        let logit_bias = logit_bias
            .into_iter()
            .map(|(t, b)| Ok((token(t, "a logit_bias token")?, b)))
            .collect::<PyResult<Vec<_>>>()?;
        let seed = seed.map(|s| s.within::<u64>("seed", 0, u64::MAX)).transpose()?;
        let options = SamplingOptions {
            temperature,
            top_p,
            top_k,
            presence_penalty,
            frequency_penalty,
            penalty_decay,
            banned,
            logit_bias,
            seed,
        };
        let sampler = Sampler::new(options, vocab_size.count("vocab_size")?).map_err(to_py)?;
        Ok(PySampler { inner: Arc::new(Mutex::new(sampler)) })
    }

    /// Logits after logit bias, bans and penalties (f32 bytes).
    fn apply_penalties<'py>(&self, py: Python<'py>, logits: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let mut l = self.logits(logits)?;
        self.lock().apply_penalties(&mut l);
        Ok(PyBytes::new(py, bytemuck::cast_slice(&l)))
    }

    /// The distribution a draw from these (already penalised) logits follows (f32 bytes).
    fn probabilities<'py>(&self, py: Python<'py>, logits: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let l = self.logits(logits)?;
        let p = self.lock().probabilities(&l);
        Ok(PyBytes::new(py, bytemuck::cast_slice(&p)))
    }

    /// Penalises `logits` and draws a token (does not record it).
    fn sample(&self, logits: &[u8]) -> PyResult<u32> {
        let mut l = self.logits(logits)?;
        let mut s = self.lock();
        s.apply_penalties(&mut l);
        Ok(s.sample(&l))
    }

    /// Counts a generated token (decay first); `token_bytes` decides the whitespace/digit rule.
    fn record(&self, token: Int, token_bytes: &[u8]) -> PyResult<()> {
        let token = token.within::<u32>("token", 0, u32::MAX)?;
        self.lock().record(token, token_bytes).map_err(to_py)
    }

    fn counts(&self) -> Vec<(u32, f64)> {
        self.lock().counts()
    }

    fn reset(&self) {
        self.lock().reset()
    }
}
