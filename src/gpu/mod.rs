//! Everything that talks to wgpu: the device, kernel sources and variants, pipelines,
//! recording.

#[cfg(test)]
mod backend_checks;
pub mod context;
pub mod pipeline_cache;
pub mod pipelines;
pub mod recorder;
pub mod shaders;
pub mod tuning_cache;
pub mod variants;

pub use context::{AdapterChoice, AdapterSummary, DeviceOptions, GpuContext};
pub use pipelines::Pipelines;
pub use recorder::{Binding, Recorder};
pub use shaders::Kernel;
pub use variants::{Codes, Formats, Variant, WkvStage};
