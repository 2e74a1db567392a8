//! Python bindings of the World tokenizer (src/tokenizer.rs).

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::errors;
use super::int::Int;
use super::to_py;
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[pyclass(name = "WorldTokenizer", module = "rwkv_gpu._core", frozen)]
pub struct PyWorldTokenizer {
    inner: Arc<Tokenizer>,
    /// One Python int per id, made once: a list of shared ints is built several times
    /// faster than one of fresh ints (CPython caches only -5..=256), and on long texts
    /// that conversion costs as much as the encoding itself.
    ints: std::sync::OnceLock<Vec<Py<PyAny>>>,
}

impl PyWorldTokenizer {
    fn id_list<'py>(&self, py: Python<'py>, ids: &[u32]) -> PyResult<Bound<'py, PyList>> {
        let ints = self.ints.get_or_init(|| {
            (0..self.inner.vocab_size() as u32)
                .map(|i| i.into_pyobject(py).expect("int conversion").into_any().unbind())
                .collect()
        });
        // Every id came from the trie, so it is below vocab_size.
        PyList::new(py, ids.iter().map(|&i| ints[i as usize].bind(py)))
    }
}

#[pymethods]
impl PyWorldTokenizer {
    #[new]
    fn new(py: Python<'_>, vocab_path: PathBuf) -> PyResult<Self> {
        let t = errors::detach(py, || Tokenizer::from_vocab_file(&vocab_path))?;
        Ok(PyWorldTokenizer { inner: Arc::new(t), ints: std::sync::OnceLock::new() })
    }

    /// Token ids of a str (its UTF-8, borrowed from the str object, not copied).
    fn encode<'py>(&self, py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyList>> {
        let t = &self.inner;
        let ids = errors::detach(py, || Ok(t.encode(text.as_bytes())))?;
        self.id_list(py, &ids)
    }

    /// Encodes several texts on all cores, with the GIL released.
    fn encode_batch<'py>(&self, py: Python<'py>, texts: Vec<String>) -> PyResult<Vec<Bound<'py, PyList>>> {
        let t = &self.inner;
        let all = errors::detach(py, || Ok(t.encode_batch(&texts)))?;
        all.iter().map(|ids| self.id_list(py, ids)).collect()
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<Int>) -> PyResult<Bound<'py, PyBytes>> {
        let ids = super::token_ids(ids, self.inner.vocab_size()).map_err(to_py)?;
        let bytes = self.inner.decode_bytes(&ids).map_err(to_py)?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// None for an id no token has (negative or past the vocabulary included).
    fn token_bytes<'py>(&self, py: Python<'py>, id: Int) -> Option<Bound<'py, PyBytes>> {
        let id = u32::try_from(id.0).ok()?;
        self.inner.token_bytes(id).map(|b| PyBytes::new(py, b))
    }

    fn stream_decoder(&self) -> PyStreamDecoder {
        PyStreamDecoder { tokenizer: self.inner.clone(), inner: std::sync::Mutex::new(StreamDecoder::new()) }
    }
}

/// Turns token ids into text as they arrive, never emitting half a UTF-8 character.
#[pyclass(name = "StreamDecoder", module = "rwkv_gpu._core", frozen)]
pub struct PyStreamDecoder {
    tokenizer: Arc<Tokenizer>,
    inner: std::sync::Mutex<StreamDecoder>,
}

#[pymethods]
impl PyStreamDecoder {
    fn push(&self, id: Int) -> PyResult<String> {
        let vocab = self.tokenizer.vocab_size();
        let id =
            u32::try_from(id.0).map_err(|_| to_py(crate::Error::token_out_of_range(id.0, None, vocab)))?;
        let mut d = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        d.push(&self.tokenizer, id).map_err(to_py)
    }

    fn finish(&self) -> String {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).finish()
    }
}
