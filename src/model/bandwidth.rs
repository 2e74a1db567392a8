//! The device's memory bandwidth, measured by a copy kernel: what a decode step (which
//! streams every weight once) is bounded by.

use std::time::Instant;

use bytemuck::{Pod, Zeroable};

use super::Model;
use crate::error::{Error, Result};
use crate::gpu::{Binding, Recorder, Variant};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CopyParams {
    n: u32,
    _pad: [u32; 3],
}

/// The most copies `copy_bandwidth` records into its one submission.
pub const MAX_COPY_REPETITIONS: usize = 1000;

impl Model {
    /// Bytes moved per second (read plus written) by copying a `bytes`-byte buffer
    /// `repetitions` times in one submission, after one warm-up copy; wall time from
    /// submission to completion. `bytes` is capped at the largest storage binding;
    /// repetitions at MAX_COPY_REPETITIONS (one submission, recorded whole on the host).
    pub fn copy_bandwidth(&self, bytes: u64, repetitions: usize) -> Result<f64> {
        let bytes = bytes.min(self.ctx.max_binding) / 16 * 16;
        if bytes == 0 || !(1..=MAX_COPY_REPETITIONS).contains(&repetitions) {
            return Err(Error::Invalid(format!(
                "copy_bandwidth needs at least 16 bytes and 1 to {MAX_COPY_REPETITIONS} repetitions (got {bytes} bytes, {repetitions})"
            )));
        }
        let src = self.ctx.create_buffer("copy source", bytes, wgpu::BufferUsages::STORAGE)?;
        let dst = self.ctx.create_buffer("copy destination", bytes, wgpu::BufferUsages::STORAGE)?;
        let pipeline = self.pipelines.get(Variant::Copy)?;
        let words = (bytes / 16) as u32;
        let (gx, gy) = self.ctx.grid(words.div_ceil(256));
        let run = |times: usize| -> Result<f64> {
            let mut rec = Recorder::new(&self.ctx);
            for _ in 0..times {
                rec.dispatch(
                    &pipeline,
                    &CopyParams { n: words, _pad: [0; 3] },
                    vec![Binding::whole(&src), Binding::whole(&dst)],
                    (gx, gy, 1),
                );
            }
            let program = rec.finish(&self.ctx)?;
            let start = Instant::now();
            program.submit(&self.ctx, false)?;
            self.ctx.wait()?;
            Ok(start.elapsed().as_secs_f64())
        };
        run(1)?;
        let seconds = run(repetitions)?;
        Ok(2.0 * bytes as f64 * repetitions as f64 / seconds)
    }
}
