//! Compiled compute pipelines, cached by their typed variant. Compilation runs inside an
//! error scope so that a bad shader is reported with its name, never a panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::context::GpuContext;
use super::shaders::preprocess;
use super::variants::Variant;
use crate::error::{Error, Result};

/// A compiled kernel variant and its label ("matvec t4 f16+int8 sg"), which profiles
/// report GPU time under.
#[derive(Clone)]
pub struct Pipeline {
    pub raw: wgpu::ComputePipeline,
    pub name: Arc<str>,
}

pub struct Pipelines {
    ctx: Arc<GpuContext>,
    cache: Mutex<HashMap<Variant, Pipeline>>,
    /// Pipelines compiled so far (tests check that steady decoding compiles none).
    pub compiled: std::sync::atomic::AtomicUsize,
}

impl Pipelines {
    pub fn new(ctx: Arc<GpuContext>) -> Self {
        Pipelines { ctx, cache: Mutex::new(HashMap::new()), compiled: Default::default() }
    }

    pub fn get(&self, variant: Variant) -> Result<Pipeline> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(&variant) {
            return Ok(p.clone());
        }
        if variant.needs_subgroups() && !self.ctx.subgroups {
            return Err(Error::Shader {
                kernel: variant.label(),
                message: "this device has no subgroup operations enabled".into(),
            });
        }
        if let (true, Err(why)) = (variant.needs_cooperative_matrices(), &self.ctx.coop_matrix) {
            return Err(Error::Shader {
                kernel: variant.label(),
                message: format!("cooperative matrices: {why}"),
            });
        }
        let kernel = variant.kernel();
        let code = preprocess(kernel.name(), kernel.source(), &variant.defines())?;
        let label = variant.label();
        let device = &self.ctx.device;
        let pipeline = self
            .ctx
            .scoped(&label, || {
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&label),
                    source: wgpu::ShaderSource::Wgsl(code.clone().into()),
                });
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: None,
                    module: &module,
                    entry_point: Some(variant.entry()),
                    compilation_options: Default::default(),
                    cache: self.ctx.pipeline_cache.as_ref().map(|c| &c.cache),
                })
            })
            .map_err(|e| match e {
                // The device, not the shader: lost, or out of memory, as any other call says.
                Error::DeviceLost(_) | Error::OutOfMemory(_) => e,
                e => Error::Shader { kernel: label.clone(), message: e.to_string() },
            })?;
        self.compiled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(c) = &self.ctx.pipeline_cache {
            c.mark();
        }
        let pipeline = Pipeline { raw: pipeline, name: label.into() };
        cache.insert(variant, pipeline.clone());
        Ok(pipeline)
    }
}
