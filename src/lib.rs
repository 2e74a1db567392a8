//! rwkv-gpu: RWKV-7 inference with WGSL compute shaders on wgpu.
//!
//! The core (this crate without the `python` feature) knows nothing of Python:
//! `gpu` opens the device and runs kernels, `loader` reads checkpoints, `model` holds
//! weights and states and plans the forward pass; `tokenizer`, `sampler` and
//! `generation` turn it into text; `parallel` spreads host loops over the cores. `python`
//! is the binding layer.

pub mod atomic_file;
pub mod error;
pub mod fair_mutex;
pub mod fuzzing;
pub mod generation;
pub mod gpu;
pub mod interrupt;
pub mod loader;
pub mod model;
pub mod parallel;
pub mod sampler;
pub mod schema;
pub mod tokenizer;

pub use error::{Error, Result};

#[cfg(feature = "python")]
mod python;
