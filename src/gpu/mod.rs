//! Everything that talks to wgpu: the device, kernel sources, pipelines, recording.

pub mod context;
pub mod pipelines;
pub mod recorder;
pub mod shaders;

pub use context::{AdapterChoice, AdapterSummary, DeviceOptions, GpuContext};
pub use pipelines::Pipelines;
pub use recorder::{Binding, Recorder};
pub use shaders::Kernel;
