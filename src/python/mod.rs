//! The Python binding layer: the only code that knows about Python. It converts
//! arguments, releases the GIL around GPU work and maps `Error` to the exception
//! hierarchy rooted at `RwkvError`. The typed public API lives in python/rwkv_gpu.

use std::path::PathBuf;
use std::sync::Arc;

use crate::fair_mutex::{FairGuard, FairMutex};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

mod errors;
mod int;
mod sampler;
mod tokenizer;

use crate::generation::{Batch, Stepped};
use crate::gpu::{context, AdapterChoice, DeviceOptions, Kernel};
use crate::interrupt::Interrupt;
use crate::model::{Config, HostState, Model, Pooling, QuantSpec, State, Want, WeightFormat};
use int::Int;

pub(crate) use errors::to_py;

fn options(
    adapter: Option<String>,
    no_f16: bool,
    no_subgroups: bool,
    max_binding: Option<Int>,
) -> PyResult<DeviceOptions> {
    let max_binding = max_binding.map(|b| b.within::<u64>("max_binding", 0, u64::MAX)).transpose()?;
    DeviceOptions {
        adapter: adapter.map(|a| AdapterChoice::parse(&a)),
        no_f16,
        no_subgroups,
        no_sparse_ffn: false,
        no_coop_matrix: false,
        coop_emulate: false,
        max_binding,
        nf4_lookup: None,
        gemm_loads: None,
        matvec_lanes: None,
        matvec_rows: None,
        matvec_depth: None,
        tune: None,
        chunk_tokens: None,
        split_k: None,
        sample_on_device: None,
    }
    .with_env()
    .map_err(to_py)
}

#[pyfunction]
fn adapters(py: Python<'_>) -> PyResult<Vec<Py<PyDict>>> {
    let list = errors::detach(py, || Ok(context::list_adapters()))?;
    list.into_iter()
        .map(|a| {
            let d = PyDict::new(py);
            d.set_item("index", a.index)?;
            d.set_item("name", a.name)?;
            d.set_item("backend", a.backend)?;
            d.set_item("device_type", a.device_type)?;
            d.set_item("driver", a.driver)?;
            d.set_item("driver_info", a.driver_info)?;
            d.set_item("shader_f16", a.shader_f16)?;
            d.set_item("subgroups", a.subgroups)?;
            d.set_item("subgroup_sizes", a.subgroup_sizes)?;
            d.set_item("cooperative_matrices", a.coop_matrix_f16)?;
            d.set_item("max_storage_binding", a.max_storage_binding)?;
            d.set_item("max_buffer_size", a.max_buffer_size)?;
            d.set_item("max_workgroups_per_dimension", a.max_workgroups_per_dimension)?;
            d.set_item("max_workgroup_invocations", a.max_workgroup_invocations)?;
            Ok(d.unbind())
        })
        .collect()
}

/// The adapter a Model would open for `adapter` (as Model's argument; None: env
/// RWKV_GPU_ADAPTER, else the best one): (index, warnings). Raises DeviceError, with the
/// list of adapters, when none would.
#[pyfunction]
#[pyo3(signature = (adapter=None))]
fn choose_adapter(py: Python<'_>, adapter: Option<String>) -> PyResult<(usize, Vec<String>)> {
    let opts = options(adapter, false, false, None)?;
    let list = errors::detach(py, || Ok(context::list_adapters()))?;
    context::select(&list, opts.adapter.as_ref()).map_err(to_py)
}

/// A checkpoint's dimensions, read from its tensor shapes without loading it.
#[pyfunction]
fn checkpoint_config<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let c = py
        .detach(|| crate::loader::open(&path).and_then(|ck| Config::from_checkpoint(ck.as_ref())))
        .map_err(to_py)?;
    dims_dict(py, &c)
}

/// A model's dimensions as a dict (shared by checkpoint_config and Model.config).
fn dims_dict<'py>(py: Python<'py>, c: &Config) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("n_layer", c.n_layer)?;
    d.set_item("n_embd", c.n_embd)?;
    d.set_item("n_head", c.n_head)?;
    d.set_item("head_size", c.head_size)?;
    d.set_item("vocab_size", c.vocab_size)?;
    d.set_item("ffn_size", c.ffn_size)?;
    d.set_item("lora_widths", (c.lora_w, c.lora_a, c.lora_v, c.lora_g))?;
    d.set_item("deep_embed_rank", c.deep_embed_rank)?;
    Ok(d)
}

/// The preprocessed WGSL of one kernel variant (for testing kernels with other compilers).
#[pyfunction]
#[pyo3(signature = (name, defines=Vec::new()))]
fn kernel_source(name: &str, defines: Vec<String>) -> PyResult<String> {
    crate::gpu::shaders::kernel_source(name, &defines).map_err(to_py)
}

#[pyclass(name = "State", module = "rwkv_gpu._core", frozen)]
struct PyState {
    inner: State,
}

#[pyclass(name = "Model", module = "rwkv_gpu._core", frozen)]
struct PyModel {
    inner: Arc<Model>,
}

/// `layer_dtypes`: one dtype for every layer or one per layer; `head_dtype`: fp16 or int8.
/// None: as the file holds them (fp16 unless it is a saved quantized model).
fn quant_spec(layer_dtypes: Option<Vec<String>>, head_dtype: Option<String>) -> PyResult<QuantSpec> {
    let layers = layer_dtypes
        .map(|l| l.iter().map(|d| WeightFormat::parse(d)).collect::<crate::Result<Vec<_>>>())
        .transpose()
        .map_err(to_py)?;
    let head = head_dtype.map(|h| WeightFormat::parse(&h)).transpose().map_err(to_py)?;
    Ok(QuantSpec { layers, head })
}

/// `values` as little-endian bytes in a new Python `bytes`. A `MemoryError` when Python
/// cannot allocate it (PyBytes::new would panic on that).
fn f32_bytes<'py>(py: Python<'py>, values: &[f32]) -> PyResult<Bound<'py, PyBytes>> {
    let raw: &[u8] = bytemuck::cast_slice(values);
    PyBytes::new_with(py, raw.len(), |out| {
        out.copy_from_slice(raw);
        Ok(())
    })
}

fn tokens_from(tokens: Vec<Int>, vocab: usize) -> PyResult<Vec<u32>> {
    token_ids(tokens, vocab).map_err(to_py)
}

/// Only what a u32 cannot hold is refused here; the core checks the vocabulary (with
/// the same error).
pub(crate) fn token_ids(tokens: Vec<Int>, vocab: usize) -> crate::Result<Vec<u32>> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &Int(t))| u32::try_from(t).map_err(|_| crate::Error::token_out_of_range(t, Some(i), vocab)))
        .collect()
}

/// Each list's ids; a failure is named by its place in the batch as the core names its own.
fn batch_token_ids(batch: Vec<Vec<Int>>, vocab: usize, what: &str) -> PyResult<Vec<Vec<u32>>> {
    let n = batch.len();
    let ids = batch.into_iter().enumerate();
    let ids = ids.map(|(i, t)| token_ids(t, vocab).map_err(|e| crate::model::in_batch_item(what, i, n, e)));
    ids.collect::<crate::Result<_>>().map_err(to_py)
}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(signature = (path, adapter=None, no_f16=false, no_subgroups=false, max_binding=None, progress=None,
                        layer_dtypes=None, head_dtype=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        adapter: Option<String>,
        no_f16: bool,
        no_subgroups: bool,
        max_binding: Option<Int>,
        progress: Option<Py<PyAny>>,
        layer_dtypes: Option<Vec<String>>,
        head_dtype: Option<String>,
    ) -> PyResult<Self> {
        let opts = options(adapter, no_f16, no_subgroups, max_binding)?;
        let quant = quant_spec(layer_dtypes, head_dtype)?;
        let model = errors::long_call(py, |interrupt, caught| {
            // An exception in the callback (Ctrl-C arriving while it runs, included) stops
            // the load and is raised.
            let mut report = |done: usize, total: usize| {
                if let Some(cb) = &progress {
                    Python::attach(|py| cb.call1(py, (done, total)).map(drop)).map_err(|e| caught.stop(e))?;
                }
                interrupt.check()
            };
            Model::open(&path, &opts, &quant, &mut report)
        })?;
        Ok(PyModel { inner: Arc::new(model) })
    }

    #[staticmethod]
    #[pyo3(signature = (n_layer, n_embd, vocab_size, seed, adapter=None, no_f16=false, no_subgroups=false, max_binding=None,
                        layer_dtypes=None, head_dtype=None))]
    #[allow(clippy::too_many_arguments)]
    fn random(
        py: Python<'_>,
        n_layer: Int,
        n_embd: Int,
        vocab_size: Int,
        seed: Int,
        adapter: Option<String>,
        no_f16: bool,
        no_subgroups: bool,
        max_binding: Option<Int>,
        layer_dtypes: Option<Vec<String>>,
        head_dtype: Option<String>,
    ) -> PyResult<Self> {
        let (n_layer, n_embd, vocab_size) =
            (n_layer.count("n_layer")?, n_embd.count("n_embd")?, vocab_size.count("vocab_size")?);
        let seed = seed.within::<u64>("seed", 0, u64::MAX)?;
        let opts = options(adapter, no_f16, no_subgroups, max_binding)?;
        let quant = quant_spec(layer_dtypes, head_dtype)?;
        let model = errors::long_call(py, |interrupt, _| {
            Model::random(n_layer, n_embd, vocab_size, seed, &opts, &quant, &mut |_, _| interrupt.check())
        })?;
        Ok(PyModel { inner: Arc::new(model) })
    }

    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.inner.config;
        let a = &self.inner.ctx.adapter;
        let d = dims_dict(py, c)?;
        d.set_item("adapter", a.name.clone())?;
        d.set_item("backend", a.backend.clone())?;
        d.set_item("device_type", a.device_type.clone())?;
        d.set_item("driver", a.driver.clone())?;
        d.set_item("shader_f16", self.inner.ctx.shader_f16)?;
        d.set_item("subgroups", self.inner.ctx.subgroups)?;
        d.set_item("nf4_lookup", self.inner.nf4_lookup().name())?;
        d.set_item("split_k", self.inner.split_k())?;
        d.set_item("tuning", self.inner.tuning.lock().unwrap_or_else(|p| p.into_inner()).source.name())?;
        let matmul = self.inner.matmul_choice.lock().unwrap_or_else(|p| p.into_inner()).clone();
        d.set_item("matmul_kernel", matmul.kernel.name())?;
        d.set_item("matmul_kernel_note", matmul.note)?;
        d.set_item("gemm_loads", self.inner.ctx.gemm_loads.name())?;
        let matvec = self.inner.matvec_shape();
        d.set_item("matvec_lanes", matvec.lanes.name())?;
        d.set_item("matvec_rows", matvec.rows)?;
        d.set_item("matvec_depth", matvec.depth)?;
        d.set_item("matvec_reduction", matvec.reduction.name())?;
        d.set_item("max_binding", self.inner.ctx.max_binding)?;
        d.set_item("chunk_tokens", self.inner.chunk_tokens())?;
        d.set_item("sample_on", if self.inner.draws_on_device() { "device" } else { "host" })?;
        Ok(d)
    }

    fn warnings(&self) -> Vec<String> {
        let tuning = self.inner.tuning.lock().unwrap_or_else(|p| p.into_inner());
        let matmul = self.inner.matmul_choice.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.ctx.warnings.iter().chain(&tuning.warnings).chain(&matmul.warning).cloned().collect()
    }

    fn new_state(&self, py: Python<'_>) -> PyResult<PyState> {
        let m = self.inner.clone();
        Ok(PyState { inner: errors::detach(py, move || m.new_state())? })
    }

    /// Returns the logits as little-endian f32 bytes ([V] or [T, V]; empty for "none").
    fn forward<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<Int>,
        state: &PyState,
        want: &str,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let want = Want::parse(want).map_err(to_py)?;
        let tokens = tokens_from(tokens, self.inner.config.vocab_size)?;
        let m = self.inner.clone();
        let s = state.inner.clone();
        let logits = errors::long_call(py, move |interrupt, _| {
            m.forward_batch_with(&[(&s, &tokens)], want, interrupt)
        })?;
        f32_bytes(py, &logits)
    }

    /// Bytes per second moved (read + written) by a copy kernel over `bytes` bytes.
    #[pyo3(signature = (bytes, repetitions=Int(10)))]
    fn copy_bandwidth(&self, py: Python<'_>, bytes: Int, repetitions: Int) -> PyResult<f64> {
        let (bytes, repetitions) =
            (bytes.within::<u64>("bytes", 0, u64::MAX)?, repetitions.count("repetitions")?);
        let m = self.inner.clone();
        errors::detach(py, move || m.copy_bandwidth(bytes, repetitions))
    }

    /// Overwrites `dst` with `src`'s contents, on the device.
    fn copy_state(&self, py: Python<'_>, src: &PyState, dst: &PyState) -> PyResult<()> {
        let m = self.inner.clone();
        let (a, b) = (src.inner.clone(), dst.inner.clone());
        errors::detach(py, move || m.copy_state(&a, &b))
    }

    /// `n` fresh states on one state page, so that `forward_batch` reads the weights
    /// once per step for all of them.
    fn new_states(&self, py: Python<'_>, n: Int) -> PyResult<Vec<PyState>> {
        let n = n.count("n")?;
        let m = self.inner.clone();
        let states = errors::detach(py, move || m.new_states(n))?;
        Ok(states.into_iter().map(|inner| PyState { inner }).collect())
    }

    /// Feeds each state its token list. Returns little-endian f32 bytes: one row per
    /// sequence ("last", "hidden_last"; "argmax": u32 ids) or per token ("all",
    /// "hidden_all"), sequence after sequence; empty for "none".
    fn forward_batch<'py>(
        &self,
        py: Python<'py>,
        batch: Vec<Vec<Int>>,
        states: Vec<PyRef<'py, PyState>>,
        want: &str,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let want = Want::parse(want).map_err(to_py)?;
        if batch.len() != states.len() {
            return Err(errors::shape(format!(
                "{} token lists but {} states: give one state per sequence",
                batch.len(),
                states.len()
            )));
        }
        let batch = batch_token_ids(batch, self.inner.config.vocab_size, "sequence")?;
        let states: Vec<State> = states.iter().map(|s| s.inner.clone()).collect();
        let m = self.inner.clone();
        let out = errors::long_call(py, move |interrupt, _| {
            let items: Vec<(&State, &[u32])> =
                states.iter().zip(&batch).map(|(s, t)| (s, t.as_slice())).collect();
            m.forward_batch_with(&items, want, interrupt)
        })?;
        f32_bytes(py, &out)
    }

    /// Feeds `tokens`; the last token's argmax, chosen on the device.
    fn forward_argmax(&self, py: Python<'_>, tokens: Vec<Int>, state: &PyState) -> PyResult<u32> {
        let tokens = tokens_from(tokens, self.inner.config.vocab_size)?;
        let m = self.inner.clone();
        let s = state.inner.clone();
        errors::long_call(py, move |interrupt, _| m.forward_argmax_with(&s, &tokens, interrupt))
    }

    /// (att_shift, wkv, ffn_shift) as f32 bytes.
    fn state_to_host<'py>(
        &self,
        py: Python<'py>,
        state: &PyState,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let m = self.inner.clone();
        let s = state.inner.clone();
        let h = errors::detach(py, move || m.state_to_host(&s))?;
        Ok((f32_bytes(py, &h.att_shift)?, f32_bytes(py, &h.wkv)?, f32_bytes(py, &h.ffn_shift)?))
    }

    fn state_from_host(
        &self,
        py: Python<'_>,
        att_shift: &[u8],
        wkv: &[u8],
        ffn_shift: &[u8],
    ) -> PyResult<PyState> {
        let host = HostState::from_le_bytes(att_shift, wkv, ffn_shift).map_err(to_py)?;
        let m = self.inner.clone();
        Ok(PyState { inner: errors::detach(py, move || m.state_from_host(&host))? })
    }

    fn clone_state(&self, py: Python<'_>, state: &PyState) -> PyResult<PyState> {
        let m = self.inner.clone();
        let s = state.inner.clone();
        Ok(PyState { inner: errors::detach(py, move || m.clone_state(&s))? })
    }

    fn save_state(&self, py: Python<'_>, state: &PyState, path: PathBuf) -> PyResult<()> {
        let m = self.inner.clone();
        let s = state.inner.clone();
        errors::detach(py, move || crate::model::state_file::save(&m, &s, &path))
    }

    #[pyo3(signature = (path, transpose=false))]
    fn load_state(&self, py: Python<'_>, path: PathBuf, transpose: bool) -> PyResult<PyState> {
        let m = self.inner.clone();
        Ok(PyState {
            inner: errors::detach(py, move || crate::model::state_file::load(&m, &path, transpose))?,
        })
    }

    /// An empty generation batch over this model (`Batch`): sequences join with `add`.
    fn batch(&self) -> PyBatch {
        PyBatch {
            inner: Arc::new(FairMutex::new(Batch::new(self.inner.clone()))),
            vocab: self.inner.config.vocab_size,
        }
    }

    /// Final normalised hidden states, one row per token list ([B, C] f32 bytes).
    fn embed<'py>(
        &self,
        py: Python<'py>,
        batch: Vec<Vec<Int>>,
        pooling: &str,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let pooling = Pooling::parse(pooling).map_err(to_py)?;
        let batch = batch_token_ids(batch, self.inner.config.vocab_size, "text")?;
        let m = self.inner.clone();
        let rows = errors::long_call(py, move |interrupt, _| m.embed_with(&batch, pooling, interrupt))?;
        f32_bytes(py, &rows)
    }

    /// Writes the model as held on the device (quantized matrices as codes + scales).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let m = self.inner.clone();
        errors::detach(py, move || m.save(&path))
    }

    /// Waits for the scratch with the GIL released: a long call holding it may be asking
    /// for the GIL (to look for signals).
    fn memory(&self, py: Python<'_>) -> PyResult<Vec<(&'static str, u64)>> {
        let m = self.inner.clone();
        errors::detach(py, move || m.memory())
    }

    fn host_memory(&self) -> Vec<(&'static str, u64)> {
        self.inner.host_memory()
    }

    /// Destroys this model's device, as a driver reset would (for tests).
    fn _lose_device(&self) {
        self.inner.ctx.lose_device();
    }

    /// The device memory allocator's view (Vulkan/DX12): (bytes in live allocations,
    /// bytes of the memory blocks it holds, holes included); None where not reported.
    fn allocator_report(&self) -> Option<(u64, u64)> {
        self.inner
            .ctx
            .device
            .generate_allocator_report()
            .map(|r| (r.total_allocated_bytes, r.total_reserved_bytes))
    }

    /// Counts from the last forward call: submissions (one per chunk), dispatches,
    /// read-backs, and the dispatches of the layers alone (ln0 and the head excluded).
    fn last_stats(&self) -> (usize, usize, usize, usize) {
        let s = self.inner.last_stats.lock().unwrap_or_else(|p| p.into_inner());
        (s.submissions, s.dispatches, s.readbacks, s.layer_dispatches)
    }

    /// Host nanoseconds the last forward call spent recording, uploading and submitting
    /// (GPU waits excluded).
    fn last_host_ns(&self) -> u64 {
        self.inner.last_stats.lock().unwrap_or_else(|p| p.into_inner()).host_ns
    }

    /// Device objects created by this model so far: (buffers, bind groups, pipelines).
    fn created(&self) -> (usize, usize, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.inner.ctx.created;
        (c.buffers.load(Relaxed), c.bind_groups.load(Relaxed), self.inner.pipelines_compiled())
    }

    /// Turns per-dispatch GPU timing on or off; returns whether the device can time
    /// (timestamp queries).
    fn set_profiling(&self, on: bool) -> bool {
        self.inner.profiling.store(on, std::sync::atomic::Ordering::Relaxed);
        self.inner.ctx.timestamps
    }

    /// Turns counting of the rows the sparse value projection reads on or off (calls
    /// made while it is on run a counting variant of the kernel).
    fn set_counting_reads(&self, on: bool) {
        self.inner.counting_reads.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Per layer, (groups of four inputs read, groups, non-zero inputs, inputs) counted
    /// by the sparse value projection since the last call; zeroes the counters.
    fn take_read_counts(&self, py: Python<'_>) -> PyResult<Vec<(u64, u64, u64, u64)>> {
        let counts = errors::detach(py, || self.inner.take_read_counts())?;
        Ok(counts.iter().map(|c| (c.groups_read, c.groups, c.nonzero_inputs, c.inputs)).collect())
    }

    /// Per layer, how its ffn value projection is stored: ("input-major" (sparse decode)
    /// or "output-major", device bytes).
    fn ffn_value_storage(&self) -> Vec<(&'static str, u64)> {
        use crate::model::weights::Layout;
        let name = |l: Layout| if l == Layout::InputMajor { "input-major" } else { "output-major" };
        self.inner
            .weights
            .layers
            .iter()
            .map(|l| (name(l.ffn_value.layout), l.ffn_value.device_bytes()))
            .collect()
    }

    /// The load-time check of the prefill kernels (see model/coop_check.rs): the largest
    /// relative difference of `kernel`'s products ("simt" or "coop_matrix") from the SIMT
    /// kernel's over the last layer's matrices and the head.
    fn matmul_disagreement(&self, py: Python<'_>, kernel: &str) -> PyResult<f64> {
        let kernel = crate::model::coop_check::MatmulKernel::parse(kernel).map_err(to_py)?;
        let m = self.inner.clone();
        errors::detach(py, move || m.matmul_disagreement(kernel))
    }

    /// [(kernel variant, GPU nanoseconds, bytes it must move or 0)] for each dispatch of
    /// the last forward call made with profiling on (empty without timestamp queries).
    fn last_profile(&self) -> Vec<(String, f64, u64)> {
        let s = self.inner.last_stats.lock().unwrap_or_else(|p| p.into_inner());
        s.timings.iter().map(|(name, ns, moves)| (name.to_string(), *ns, *moves)).collect()
    }

    /// The formats the matrices ended up in: [(name, format)] for each layer matrix and the head.
    fn weight_formats(&self) -> Vec<(String, &'static str)> {
        let w = &self.inner.weights;
        let mut out: Vec<(String, &'static str)> = Vec::new();
        for (i, layer) in w.layers.iter().enumerate() {
            for (entry, which) in crate::schema::layer_matrices() {
                let name = entry.name_in(i);
                out.push((
                    name.strip_suffix(".weight").unwrap_or(&name).to_string(),
                    layer.matrix(which).format.name(),
                ));
            }
        }
        out.push(("head".to_string(), w.head.format.name()));
        out
    }

    fn fingerprint(&self) -> String {
        format!("{:016x}", self.inner.weights.fingerprint)
    }
}

#[pyclass(name = "Batch", module = "rwkv_gpu._core", frozen)]
struct PyBatch {
    inner: Arc<FairMutex<Batch>>,
    vocab: usize,
}

/// The batch, waited for; a signal handler or callback inside a step on this thread
/// (which holds it) is refused rather than left waiting for itself.
fn lock_batch(batch: &FairMutex<Batch>) -> crate::Result<FairGuard<'_, Batch>> {
    batch.lock().map_err(|_| {
        crate::Error::State(
            "this batch is in the middle of a step on this thread: a signal handler cannot use it".into(),
        )
    })
}

fn sequence_id(id: Int) -> PyResult<u64> {
    id.within::<u64>("sequence id", 0, u64::MAX)
}

impl PyBatch {
    /// Runs `f` on the batch, locked, as a long call (GIL released, interruptible).
    fn detached<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Batch, Interrupt) -> crate::Result<T> + Send,
    ) -> PyResult<T> {
        let batch = self.inner.clone();
        errors::long_call(py, move |interrupt, _| f(&mut *lock_batch(&batch)?, interrupt))
    }

    /// Runs `f` on the batch, locked. The lock is waited for with the GIL released: a
    /// step holding it may be asking for the GIL (to look for signals).
    fn locked<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Batch) -> crate::Result<T> + Send,
    ) -> PyResult<T> {
        let batch = self.inner.clone();
        errors::detach(py, move || f(&mut *lock_batch(&batch)?))
    }
}

/// One step's result for a sequence: (id, drawn token, None, its log-probability,
/// [(token, log-probability)] of the most likely) where it drew, (id, None, prompt
/// tokens fed, None, []) where it paused.
type SteppedTuple = (u64, Option<u32>, Option<usize>, Option<f32>, Vec<(u32, f32)>);

#[pymethods]
impl PyBatch {
    /// Adds a sequence over `state` that feeds `prompt`, then draws with a copy of
    /// `sampler`, reset (penalty counts start empty for each run, as the official's
    /// do); it pauses after each prompt length in `pauses`. Returns its id.
    #[pyo3(signature = (state, sampler, prompt, pauses=Vec::new(), top_logprobs=None))]
    fn add(
        &self,
        py: Python<'_>,
        state: &PyState,
        sampler: &sampler::PySampler,
        prompt: Vec<Int>,
        pauses: Vec<Int>,
        top_logprobs: Option<Int>,
    ) -> PyResult<u64> {
        let prompt = tokens_from(prompt, self.vocab)?;
        let pauses = pauses.into_iter().map(|p| p.count("pause point")).collect::<PyResult<Vec<_>>>()?;
        let top = top_logprobs.map(|n| n.count("top_logprobs")).transpose()?;
        let mut smp = sampler.lock().clone();
        smp.reset();
        let state = state.inner.clone();
        self.locked(py, move |b| b.add(state, smp, prompt, pauses, top))
    }

    /// The most prompt tokens one step feeds over all sequences reading a prompt (0: no limit).
    fn set_prefill_budget(&self, py: Python<'_>, tokens: Int) -> PyResult<()> {
        let tokens = tokens.count("max_prefill_tokens")?;
        self.locked(py, move |b| {
            b.set_prefill_budget(tokens);
            Ok(())
        })
    }

    /// Feeds every live sequence's pending tokens in one call and draws for those that
    /// fed all they had (GIL released).
    fn step(&self, py: Python<'_>) -> PyResult<Vec<SteppedTuple>> {
        let stepped = self.detached(py, |b, interrupt| b.step_with(interrupt))?;
        Ok(stepped
            .into_iter()
            .map(|s| match s {
                Stepped::Drew { id, token, logprob, top } => (id, Some(token), None, logprob, top),
                Stepped::Paused { id, at } => (id, None, Some(at), None, Vec::new()),
            })
            .collect())
    }

    fn record(&self, py: Python<'_>, id: Int, token: Int, token_bytes: Vec<u8>) -> PyResult<()> {
        let (id, token) = (sequence_id(id)?, token.within::<u32>("token", 0, u32::MAX)?);
        self.locked(py, move |b| b.record(id, token, &token_bytes))
    }

    /// Sequence `id` takes no more steps; its drawn token is fed by `finish` only when
    /// `feed_pending` (a stop string's token is, a stop token is not).
    fn stop(&self, py: Python<'_>, id: Int, feed_pending: bool) -> PyResult<()> {
        let id = sequence_id(id)?;
        self.locked(py, move |b| b.stop(id, feed_pending))
    }

    /// Ends the sequences in `ids` (default all), feeding the drawn tokens the caller took
    /// (a prompt not all in is fed no further).
    #[pyo3(signature = (ids=None))]
    fn finish(&self, py: Python<'_>, ids: Option<Vec<Int>>) -> PyResult<()> {
        let ids =
            ids.map(|ids| ids.into_iter().map(sequence_id).collect::<PyResult<Vec<u64>>>()).transpose()?;
        self.detached(py, move |b, interrupt| b.finish_with(ids.as_deref(), interrupt))
    }

    /// Finishes sequence `id` and takes it out; returns (fed, given).
    fn remove(&self, py: Python<'_>, id: Int) -> PyResult<(Vec<u32>, Vec<u32>)> {
        let id = sequence_id(id)?;
        self.detached(py, move |b, interrupt| b.remove_with(id, interrupt))
    }

    fn fed(&self, py: Python<'_>, id: Int) -> PyResult<Vec<u32>> {
        let id = sequence_id(id)?;
        self.locked(py, move |b| Ok(b.fed(id)?.to_vec()))
    }

    /// The tokens the caller has taken (recorded) from sequence `id`.
    fn given(&self, py: Python<'_>, id: Int) -> PyResult<Vec<u32>> {
        let id = sequence_id(id)?;
        self.locked(py, move |b| Ok(b.given(id)?.to_vec()))
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.locked(py, |b| Ok(b.len()))
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(adapters, m)?)?;
    m.add_function(wrap_pyfunction!(choose_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_source, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_config, m)?)?;
    m.add_function(wrap_pyfunction!(sampler::sampling_defaults, m)?)?;
    m.add_class::<PyModel>()?;
    m.add_class::<PyState>()?;
    m.add_class::<sampler::PySampler>()?;
    m.add_class::<PyBatch>()?;
    m.add_class::<tokenizer::PyWorldTokenizer>()?;
    m.add_class::<tokenizer::PyStreamDecoder>()?;
    m.add("kernels", PyList::new(py, Kernel::ALL.map(|k| k.name()))?)?;
    // The layer matrices `dtype` quantizes, as weight_formats names them (the schema's).
    let projections: Vec<&str> = crate::schema::layer_matrices()
        .filter(|(_, m)| m.quantizable())
        .map(|(e, _)| e.name.strip_suffix(".weight").unwrap_or(e.name))
        .collect();
    m.add("projections", PyList::new(py, projections)?)?;
    m.add("max_top_logprobs", crate::generation::MAX_TOP_LOGPROBS)?;
    // Before finalization: calls still inside on other threads come back out first.
    py.import("atexit")?.call_method1("register", (wrap_pyfunction!(errors::at_exit, m)?,))?;
    Ok(())
}
