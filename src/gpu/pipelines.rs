//! Compiled compute pipelines, cached by (kernel, entry point, defines). Compilation runs
//! inside an error scope so that a bad shader is reported with its name, never a panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::context::GpuContext;
use super::shaders::{preprocess, Kernel};
use crate::error::{Error, Result};

type Key = (Kernel, &'static str, Vec<(String, String)>);

/// A compiled kernel variant and its name ("matmul:matvec WEIGHT_INT8 WEIGHT_QUANT"),
/// which profiles report GPU time under.
#[derive(Clone)]
pub struct Pipeline {
    pub raw: wgpu::ComputePipeline,
    pub name: Arc<str>,
}

pub struct Pipelines {
    ctx: Arc<GpuContext>,
    cache: Mutex<HashMap<Key, Pipeline>>,
}

impl Pipelines {
    pub fn new(ctx: Arc<GpuContext>) -> Self {
        Pipelines { ctx, cache: Mutex::new(HashMap::new()) }
    }

    /// Flags (`"ADD"`) and valued defines (`"N_MIX=6u"`) in one list.
    pub fn get(&self, kernel: Kernel, entry: &'static str, defines: &[&str]) -> Result<Pipeline> {
        let mut defs: Vec<(String, String)> = defines
            .iter()
            .map(|d| match d.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (d.to_string(), String::new()),
            })
            .collect();
        defs.sort();
        let key = (kernel, entry, defs);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let code = preprocess(kernel.name(), kernel.source(), &key.2)?;
        let label = format!("{}:{} {:?}", kernel.name(), entry, key.2);
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
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                })
            })
            .map_err(|e| Error::Shader { kernel: label.clone(), message: e.to_string() })?;
        let mut name = format!("{}:{}", kernel.name(), entry);
        for (k, v) in &key.2 {
            name.push(' ');
            name.push_str(k);
            if !v.is_empty() {
                name.push('=');
                name.push_str(v.trim_end_matches('u'));
            }
        }
        let pipeline = Pipeline { raw: pipeline, name: name.into() };
        cache.insert(key, pipeline.clone());
        Ok(pipeline)
    }
}
