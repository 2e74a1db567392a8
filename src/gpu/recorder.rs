//! Records a forward pass as a list of dispatches, then encodes them into one compute
//! pass and one queue submission. Each dispatch's parameters go into one shared uniform
//! buffer (at the device's uniform offset alignment), uploaded once per submission.

use super::context::GpuContext;
use crate::error::{Error, Result};

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
    pipeline: wgpu::ComputePipeline,
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
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub dispatches: usize,
    pub copies: usize,
}

pub struct Recorder {
    steps: Vec<Step>,
    params: Vec<u8>,
    align: usize,
    pub counts: Counts,
}

impl Recorder {
    pub fn new(ctx: &GpuContext) -> Recorder {
        Recorder { steps: Vec::new(), params: Vec::new(), align: ctx.uniform_offset_alignment.max(16) as usize, counts: Counts::default() }
    }

    /// Binding 0 is the uniform `params`; `bindings` are bindings 1.. in order.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        pipeline: &wgpu::ComputePipeline,
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
        let counts = self.counts;
        let needed = (self.params.len().max(16) as u64).next_multiple_of(256);
        let device = &ctx.device;
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
                            layout: &d.pipeline.get_bind_group_layout(0),
                            entries: &entries,
                        });
                        let p = pass.get_or_insert_with(|| {
                            encoder
                                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None })
                                .forget_lifetime()
                        });
                        p.set_pipeline(&d.pipeline);
                        p.set_bind_group(0, &group, &[]);
                        p.dispatch_workgroups(d.grid.0, d.grid.1, d.grid.2);
                    }
                    Step::Copy(c) => {
                        drop(pass.take());
                        encoder.copy_buffer_to_buffer(&c.src, c.src_offset, &c.dst, c.dst_offset, c.size);
                    }
                }
            }
            drop(pass);
            ctx.queue.submit([encoder.finish()]);
        })?;
        Ok(counts)
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
