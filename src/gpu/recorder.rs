//! Records a list of dispatches and copies, then turns it into a `Program`: the bind
//! groups made and every dispatch's parameters uploaded into one uniform buffer (at the
//! device's uniform offset alignment), once. A program is encoded into one compute pass
//! and submitted as often as needed, so a decode step that repeats the last one's
//! shapes creates nothing on the device and uploads no parameters. The next submission's
//! command buffer can be encoded ahead, while the GPU runs this one (`encode_spare`).

use std::sync::{Arc, Mutex};

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
    /// Bytes the dispatch must move at least (0: not stated); profiles divide by its time.
    moves: u64,
}

#[derive(Clone)]
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
    /// With profiling on a device with timestamp queries: each dispatch's kernel variant
    /// label, GPU time in nanoseconds and the bytes it must move (0: not stated), in order.
    pub timings: Vec<(Arc<str>, f64, u64)>,
    /// The queue submission that ran it (`Program::submit`), to wait for it alone.
    pub submission: Option<wgpu::SubmissionIndex>,
}

pub struct Recorder {
    steps: Vec<Step>,
    params: Vec<u8>,
    align: usize,
    pub counts: Counts,
}

impl Recorder {
    pub fn new(ctx: &GpuContext) -> Recorder {
        Recorder {
            steps: Vec::new(),
            params: Vec::new(),
            align: ctx.uniform_offset_alignment.max(16) as usize,
            counts: Counts::default(),
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
        self.dispatch_moving(pipeline, params, bindings, grid, 0);
    }

    /// As `dispatch`, stating the bytes the dispatch must read and write at least
    /// (profiles report them per second of its GPU time).
    pub fn dispatch_moving<P: bytemuck::Pod>(
        &mut self,
        pipeline: &Pipeline,
        params: &P,
        bindings: Vec<Binding>,
        grid: (u32, u32, u32),
        moves: u64,
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
            moves,
        }));
    }

    pub fn copy(&mut self, copy: Copy) {
        self.counts.copies += 1;
        self.steps.push(Step::Copy(copy));
    }

    /// Makes the uniform buffer and the bind groups.
    pub fn finish(self, ctx: &GpuContext) -> Result<Program> {
        let device = &ctx.device;
        let size = (self.params.len().max(16) as u64).next_multiple_of(256);
        let uniform = ctx.create_buffer(
            "dispatch params",
            size,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        let steps = ctx.scoped("recording a forward pass", || {
            ctx.queue.write_buffer(&uniform, 0, &self.params);
            self.steps
                .into_iter()
                .map(|step| match step {
                    Step::Copy(c) => Encoded::Copy(c),
                    Step::Dispatch(d) => {
                        let mut entries = vec![wgpu::BindGroupEntry {
                            binding: 0,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: &uniform,
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
                        ctx.count_bind_group();
                        Encoded::Dispatch { pipeline: d.pipeline, group, grid: d.grid, moves: d.moves }
                    }
                })
                .collect::<Vec<_>>()
        })?;
        Ok(Program { steps, counts: self.counts, _uniform: uniform, spare: Mutex::new(None) })
    }

    /// Finishes and submits once (for work that does not repeat).
    pub fn submit(self, ctx: &GpuContext) -> Result<Counts> {
        self.finish(ctx)?.submit(ctx, false)
    }
}

/// A timed dispatch's kernel label and stated bytes.
type TimedDispatch = (Arc<str>, u64);

enum Encoded {
    Dispatch { pipeline: Pipeline, group: wgpu::BindGroup, grid: (u32, u32, u32), moves: u64 },
    Copy(Copy),
}

/// A recording ready to submit: pipelines, bind groups and uploaded parameters.
pub struct Program {
    steps: Vec<Encoded>,
    pub counts: Counts,
    /// Held by the bind groups too; kept here to say that the program owns it.
    _uniform: wgpu::Buffer,
    /// A command buffer encoded ahead of need (`encode_spare`), which the next untimed
    /// submission takes instead of encoding its own.
    spare: Mutex<Option<wgpu::CommandBuffer>>,
}

impl Program {
    /// Submits the program once: the spare command buffer if one was encoded ahead, else
    /// one encoded now. `profile`: time each dispatch on the GPU (one compute pass each,
    /// so that the timestamps bracket it alone; slower, for profiling only).
    pub fn submit(&self, ctx: &GpuContext, profile: bool) -> Result<Counts> {
        let mut counts = self.counts.clone();
        let timed = if profile && ctx.timestamps { counts.dispatches.min(MAX_TIMED) } else { 0 };
        if timed == 0 {
            let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
            let buffer = match spare {
                Some(buffer) => buffer,
                None => self.encode(ctx, None)?.0,
            };
            counts.submission = Some(ctx.scoped("submitting a forward pass", || ctx.queue.submit([buffer]))?);
            return Ok(counts);
        }
        let timer = Timer::new(ctx, timed)?;
        let (buffer, names) = self.encode(ctx, Some((&timer, timed)))?;
        counts.submission = Some(ctx.scoped("submitting a forward pass", || ctx.queue.submit([buffer]))?);
        counts.timings =
            names.into_iter().zip(timer.read(ctx, timed)?).map(|((n, m), ns)| (n, ns, m)).collect();
        Ok(counts)
    }

    /// Encodes the next submission's command buffer now, while the GPU runs this one, so
    /// that a decode loop's next step only uploads and submits. Nothing if one is spare.
    pub fn encode_spare(&self, ctx: &GpuContext) -> Result<()> {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.is_none() {
            *spare = Some(self.encode(ctx, None)?.0);
        }
        Ok(())
    }

    /// Every step in order into one command buffer; with `timer`, the first `timed`
    /// dispatches each in a compute pass of its own between two timestamps, and their
    /// names and stated bytes in order.
    fn encode(
        &self,
        ctx: &GpuContext,
        timer: Option<(&Timer, usize)>,
    ) -> Result<(wgpu::CommandBuffer, Vec<TimedDispatch>)> {
        let mut names = Vec::new();
        let buffer = ctx.scoped("encoding a forward pass", || {
            let mut encoder =
                ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("forward") });
            let mut pass: Option<wgpu::ComputePass<'static>> = None;
            for step in &self.steps {
                match step {
                    Encoded::Dispatch { pipeline, group, grid, moves } => {
                        let timing = timer.filter(|(_, timed)| names.len() < *timed).map(|(t, _)| t);
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
                                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                                    label: None,
                                    timestamp_writes,
                                })
                                .forget_lifetime()
                        });
                        p.set_pipeline(&pipeline.raw);
                        p.set_bind_group(0, group, &[]);
                        p.dispatch_workgroups(grid.0, grid.1, grid.2);
                        if timing.is_some() {
                            drop(pass.take());
                            names.push((pipeline.name.clone(), *moves));
                        }
                    }
                    Encoded::Copy(c) => {
                        drop(pass.take());
                        encoder.copy_buffer_to_buffer(&c.src, c.src_offset, &c.dst, c.dst_offset, c.size);
                    }
                }
            }
            drop(pass);
            if let Some((t, _)) = timer {
                t.resolve(&mut encoder, names.len());
            }
            encoder.finish()
        })?;
        Ok((buffer, names))
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
    fn new(ctx: &GpuContext, dispatches: usize) -> Result<Timer> {
        let bytes = (16 * dispatches) as u64;
        Ok(Timer {
            queries: ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("dispatch timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * dispatches as u32,
            }),
            resolved: ctx.create_buffer(
                "timestamps",
                bytes,
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            )?,
            staging: ctx.create_buffer(
                "timestamps",
                bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )?,
        })
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
