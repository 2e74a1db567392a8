//! Records a forward pass as a list of dispatches, then encodes them into one compute
//! pass and one queue submission. Each dispatch's parameters go into one shared uniform
//! buffer (at the device's uniform offset alignment), uploaded once per submission.

use std::sync::Arc;

use super::context::GpuContext;
use super::pipelines::Pipeline;
use crate::error::{Error, Result};

/// Dispatches timed in one submission at most (two timestamps each).
const MAX_TIMED: usize = 2048;

/// A storage binding: a whole buffer or a window of one.
#[derive(Clone)]
pub struct Binding {
    pub buffer: wgpu::Buffer,
    pub offset: u64,
    pub size: Option<u64>,
}

impl Binding {
    pub fn whole(buffer: &wgpu::Buffer) -> Binding {
        Binding { buffer: buffer.clone(), offset: 0, size: None }
    }
}

struct Dispatch {
    pipeline: Pipeline,
    params_at: u64,
    params_len: u64,
    bindings: Vec<Binding>,
    grid: (u32, u32, u32),
}

pub struct Copy {
    pub src: wgpu::Buffer,
    pub src_offset: u64,
    pub dst: wgpu::Buffer,
    pub dst_offset: u64,
    pub size: u64,
}

enum Step {
    Dispatch(Dispatch),
    Copy(Copy),
}

/// Counts kept for profiling and for the tests that guard them.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub dispatches: usize,
    pub copies: usize,
    /// With `Recorder::profile` on a device with timestamp queries: each dispatch's GPU
    /// time in nanoseconds, under its kernel's name, in order.
    pub timings: Vec<(Arc<str>, f64)>,
}

pub struct Recorder {
    steps: Vec<Step>,
    params: Vec<u8>,
    align: usize,
    pub counts: Counts,
    /// Time each dispatch on the GPU (one compute pass each, so that the timestamps
    /// bracket it alone). Slower: for profiling only.
    pub profile: bool,
}

impl Recorder {
    pub fn new(ctx: &GpuContext) -> Recorder {
        Recorder {
            steps: Vec::new(),
            params: Vec::new(),
            align: ctx.uniform_offset_alignment.max(16) as usize,
            counts: Counts::default(),
            profile: false,
        }
    }

    /// Binding 0 is the uniform `params`; `bindings` are bindings 1.. in order.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        pipeline: &Pipeline,
        params: &P,
        bindings: Vec<Binding>,
        grid: (u32, u32, u32),
    ) {
        let at = self.params.len().next_multiple_of(self.align);
        self.params.resize(at, 0);
        self.params.extend_from_slice(bytemuck::bytes_of(params));
        self.counts.dispatches += 1;
        self.steps.push(Step::Dispatch(Dispatch {
            pipeline: pipeline.clone(),
            params_at: at as u64,
            params_len: std::mem::size_of::<P>() as u64,
            bindings,
            grid,
        }));
    }

    pub fn copy(&mut self, copy: Copy) {
        self.counts.copies += 1;
        self.steps.push(Step::Copy(copy));
    }

    /// Creates the bind groups, encodes every step in order and submits once.
    pub fn submit(self, ctx: &GpuContext, uniform: &mut Option<wgpu::Buffer>) -> Result<Counts> {
        let mut counts = self.counts.clone();
        let needed = (self.params.len().max(16) as u64).next_multiple_of(256);
        let device = &ctx.device;
        let timed = if self.profile && ctx.timestamps { counts.dispatches.min(MAX_TIMED) } else { 0 };
        let timer = (timed > 0).then(|| Timer::new(ctx, timed));
        let mut names = Vec::with_capacity(timed);
        ctx.scoped("recording a forward pass", || {
            if uniform.as_ref().map(|b| b.size() < needed).unwrap_or(true) {
                *uniform = Some(device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("dispatch params"),
                    size: needed.next_power_of_two(),
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }));
            }
            let params_buffer = uniform.as_ref().expect("just created");
            ctx.queue.write_buffer(params_buffer, 0, &self.params);

            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("forward") });
            let mut pass: Option<wgpu::ComputePass<'static>> = None;
            for step in &self.steps {
                match step {
                    Step::Dispatch(d) => {
                        let mut entries = vec![wgpu::BindGroupEntry {
                            binding: 0,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: params_buffer,
                                offset: d.params_at,
                                size: wgpu::BufferSize::new(d.params_len),
                            }),
                        }];
                        for (i, b) in d.bindings.iter().enumerate() {
                            entries.push(wgpu::BindGroupEntry {
                                binding: i as u32 + 1,
                                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: &b.buffer,
                                    offset: b.offset,
                                    size: b.size.and_then(wgpu::BufferSize::new),
                                }),
                            });
                        }
                        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                            label: None,
                            layout: &d.pipeline.raw.get_bind_group_layout(0),
                            entries: &entries,
                        });
                        let timing = timer.as_ref().filter(|_| names.len() < timed);
                        if timing.is_some() {
                            drop(pass.take());
                        }
                        let p = pass.get_or_insert_with(|| {
                            let timestamp_writes = timing.map(|t| wgpu::ComputePassTimestampWrites {
                                query_set: &t.queries,
                                beginning_of_pass_write_index: Some(2 * names.len() as u32),
                                end_of_pass_write_index: Some(2 * names.len() as u32 + 1),
                            });
                            encoder
                                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes })
                                .forget_lifetime()
                        });
                        p.set_pipeline(&d.pipeline.raw);
                        p.set_bind_group(0, &group, &[]);
                        p.dispatch_workgroups(d.grid.0, d.grid.1, d.grid.2);
                        if timing.is_some() {
                            drop(pass.take());
                            names.push(d.pipeline.name.clone());
                        }
                    }
                    Step::Copy(c) => {
                        drop(pass.take());
                        encoder.copy_buffer_to_buffer(&c.src, c.src_offset, &c.dst, c.dst_offset, c.size);
                    }
                }
            }
            drop(pass);
            if let Some(t) = &timer {
                t.resolve(&mut encoder, names.len());
            }
            ctx.queue.submit([encoder.finish()]);
        })?;
        if let Some(t) = timer {
            counts.timings = names.into_iter().zip(t.read(ctx, timed)?).collect();
        }
        Ok(counts)
    }
}

/// Timestamp queries around each timed dispatch, resolved and read back after the
/// submission.
struct Timer {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    staging: wgpu::Buffer,
}

impl Timer {
    fn new(ctx: &GpuContext, dispatches: usize) -> Timer {
        let bytes = (16 * dispatches) as u64;
        let buffer = |usage| ctx.device.create_buffer(&wgpu::BufferDescriptor { label: Some("timestamps"), size: bytes, usage, mapped_at_creation: false });
        Timer {
            queries: ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("dispatch timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * dispatches as u32,
            }),
            resolved: buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            staging: buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
        }
    }

    fn resolve(&self, encoder: &mut wgpu::CommandEncoder, dispatches: usize) {
        encoder.resolve_query_set(&self.queries, 0..2 * dispatches as u32, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.staging, 0, (16 * dispatches) as u64);
    }

    /// Each dispatch's duration in nanoseconds.
    fn read(&self, ctx: &GpuContext, dispatches: usize) -> Result<Vec<f64>> {
        let raw = read_buffer(ctx, &self.staging, (16 * dispatches) as u64)?;
        let ticks: &[u64] = bytemuck::cast_slice(&raw);
        let period = ctx.queue.get_timestamp_period() as f64;
        Ok(ticks.chunks_exact(2).map(|t| t[1].saturating_sub(t[0]) as f64 * period).collect())
    }
}

/// Reads `size` bytes of `buffer` (which must have COPY_SRC) back to the host.
pub fn read_buffer(ctx: &GpuContext, staging: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
    let slice = staging.slice(0..size);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.wait()?;
    rx.recv()
        .map_err(|_| Error::Device("read-back was never answered".into()))?
        .map_err(|e| Error::Device(format!("read-back failed: {e}")))?;
    let data = slice
        .get_mapped_range()
        .map_err(|e| Error::Device(format!("read-back mapping failed: {e}")))?
        .to_vec();
    staging.unmap();
    Ok(data)
}
