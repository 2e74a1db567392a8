//! Which kernel runs the prefill matrix products: the SIMT one (shaders/matmul_mat.wgsl)
//! everywhere, or the one on cooperative matrices (shaders/matmul_coop.wgsl) where the
//! device offers them. wgpu's cooperative matrices are experimental and no device in CI
//! has them, so a model turns that kernel on only after a check at load: each of one
//! layer's matrices (and the head's) multiplies the same inputs through both kernels,
//! over a chunk of CHECK_TOKENS tokens (one full and one partial tile of tokens), and
//! every product must agree within TOLERANCE. A failed check (or a kernel that does not
//! compile) leaves the SIMT kernel in place with a warning that says why.

use std::sync::atomic::Ordering;

use super::ops::{self, Act, Product};
use super::weights::Matrix;
use super::Model;
use crate::error::{Error, Result};
use crate::gpu::recorder::{read_buffer, Copy};
use crate::gpu::Recorder;

/// Tokens of the check's chunk: past ops::MATVEC_TOKENS (so the matrix kernels run) and
/// one full 64-token tile plus a partial one.
const CHECK_TOKENS: usize = 80;

/// The largest relative difference (L2 norm of the difference over the L2 norm of the
/// SIMT kernel's outputs, per product) the check accepts. Rounding the inputs to f16
/// costs a relative 2^-11 per term, about 5e-4 over a product's outputs for inputs like
/// these (independent errors); a kernel that reads a block transposed, misses a tile or
/// sums a step twice is off by 0.1 or more.
pub const TOLERANCE: f64 = 1e-2;

/// A prefill matrix kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatmulKernel {
    Simt,
    CoopMatrix,
}

impl MatmulKernel {
    pub fn name(self) -> &'static str {
        match self {
            MatmulKernel::Simt => "simt",
            MatmulKernel::CoopMatrix => "coop_matrix",
        }
    }

    pub fn parse(text: &str) -> Result<MatmulKernel> {
        [MatmulKernel::Simt, MatmulKernel::CoopMatrix].into_iter().find(|k| k.name() == text).ok_or_else(
            || Error::Invalid(format!("kernel must be \"simt\" or \"coop_matrix\", got {text:?}")),
        )
    }
}

/// What a model's prefill products run on, and why (the check's result, or why the
/// device cannot).
#[derive(Debug, Clone)]
pub struct MatmulChoice {
    pub kernel: MatmulKernel,
    pub note: String,
    /// Set when the check failed: shown with the load's warnings.
    pub warning: Option<String>,
}

impl Default for MatmulChoice {
    fn default() -> Self {
        MatmulChoice { kernel: MatmulKernel::Simt, note: String::new(), warning: None }
    }
}

/// Relative L2 difference of `got` from `want` (0 when both are zero).
pub fn relative_difference(got: &[f32], want: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    if got.len() != want.len() || diff.is_nan() {
        return f64::INFINITY;
    }
    if norm == 0.0 {
        return if diff == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (diff / norm).sqrt()
}

impl Model {
    /// The kernel prefill products run on now.
    pub fn matmul_kernel(&self) -> MatmulKernel {
        if self.coop_matrix.load(Ordering::Relaxed) {
            MatmulKernel::CoopMatrix
        } else {
            MatmulKernel::Simt
        }
    }

    fn set_matmul_kernel(&self, kernel: MatmulKernel) {
        self.coop_matrix.store(kernel == MatmulKernel::CoopMatrix, Ordering::Relaxed);
    }

    /// Chooses the prefill kernel (see the module notes); called once, at load.
    pub(crate) fn choose_matmul_kernel(&self) -> Result<()> {
        let choice = match &self.ctx.coop_matrix {
            Err(why) => MatmulChoice {
                kernel: MatmulKernel::Simt,
                note: format!("SIMT; cooperative matrices: {why}"),
                warning: None,
            },
            Ok(coop) => match self.matmul_disagreement(MatmulKernel::CoopMatrix) {
                Ok(worst) if worst <= TOLERANCE => MatmulChoice {
                    kernel: MatmulKernel::CoopMatrix,
                    note: format!(
                        "cooperative matrices{} (16x16x16 f16, f32 sums, subgroups of {}); checked at load: \
                         largest relative difference from SIMT {worst:.1e}",
                        if coop.emulated { ", emulated" } else { "" },
                        if coop.min_subgroup == coop.max_subgroup {
                            coop.min_subgroup.to_string()
                        } else {
                            format!("{} to {}", coop.min_subgroup, coop.max_subgroup)
                        }
                    ),
                    warning: None,
                },
                Ok(worst) => {
                    let why =
                        format!("their products differ from the SIMT kernel's by {worst:.1e} (relative)");
                    failed_check(why)
                }
                Err(Error::DeviceLost(e)) => return Err(Error::DeviceLost(e)),
                Err(e) => failed_check(e.to_string()),
            },
        };
        self.set_matmul_kernel(choice.kernel);
        *self.matmul_choice.lock().unwrap_or_else(|p| p.into_inner()) = choice;
        Ok(())
    }

    /// The largest relative difference between `kernel`'s products and the SIMT
    /// kernel's, over the last layer's matrices and the head, on the same inputs (a
    /// deterministic pattern in [-1, 1)). Leaves the model's kernel as it was.
    pub fn matmul_disagreement(&self, kernel: MatmulKernel) -> Result<f64> {
        if let (MatmulKernel::CoopMatrix, Err(why)) = (kernel, &self.ctx.coop_matrix) {
            return Err(Error::Device(format!("cooperative matrices: {why}")));
        }
        let layer =
            self.weights.layers.last().ok_or_else(|| Error::Invalid("the model has no layers".into()))?;
        let mut matrices: Vec<&Matrix> = vec![
            &layer.receptance,
            &layer.key,
            &layer.value,
            &layer.output,
            &layer.w1,
            &layer.w2,
            &layer.a1,
            &layer.a2,
            &layer.v1,
            &layer.v2,
            &layer.g1,
            &layer.g2,
            &layer.ffn_key,
            &layer.ffn_value,
            &self.weights.head,
        ];
        if let Some(deep) = &layer.deep {
            matrices.extend([&deep.emb_x, &deep.s1]);
        }
        let before = self.matmul_kernel();
        let result = self.disagreement_over(&matrices, kernel);
        self.set_matmul_kernel(before);
        result
    }

    fn disagreement_over(&self, matrices: &[&Matrix], kernel: MatmulKernel) -> Result<f64> {
        let ctx = &self.ctx;
        let t = CHECK_TOKENS;
        let k_max = matrices.iter().map(|w| w.k).max().unwrap_or(0);
        let m_max = matrices.iter().map(|w| w.m).max().unwrap_or(0);
        let storage =
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
        let x = ctx.create_buffer("kernel check inputs", (4 * t * k_max) as u64, storage)?;
        let y = ctx.create_buffer("kernel check outputs", (4 * t * m_max) as u64, storage)?;
        let staging = ctx.create_buffer(
            "kernel check read-back",
            (4 * t * m_max) as u64,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        // A fixed pattern with every sign and a spread of sizes (a small LCG).
        let mut seed = 0x2545_f491u32;
        let inputs: Vec<f32> = (0..t * k_max)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect();
        ctx.queue.write_buffer(&x, 0, bytemuck::cast_slice(&inputs));
        let mut worst = 0.0f64;
        for w in matrices {
            let product = |kernel: MatmulKernel| -> Result<Vec<f32>> {
                self.set_matmul_kernel(kernel);
                let mut rec = Recorder::new(ctx);
                let p = Product { w, x_off: 0, y_off: 0, y_stride: w.m, act: Act::None, add: false };
                ops::products(self, &mut rec, &x, &y, t, &[p])?;
                let size = (4 * t * w.m) as u64;
                rec.copy(Copy { src: y.clone(), src_offset: 0, dst: staging.clone(), dst_offset: 0, size });
                rec.submit(ctx)?;
                let bytes = read_buffer(ctx, &staging, size)?;
                Ok(bytemuck::pod_collect_to_vec(&bytes))
            };
            let want = product(MatmulKernel::Simt)?;
            let got = product(kernel)?;
            worst = worst.max(relative_difference(&got, &want));
        }
        Ok(worst)
    }
}

fn failed_check(why: String) -> MatmulChoice {
    MatmulChoice {
        kernel: MatmulKernel::Simt,
        note: format!("SIMT; cooperative matrices failed the check at load: {why}"),
        warning: Some(format!(
            "cooperative matrices failed the check at load ({why}); prefill uses the SIMT kernel \
             (RWKV_GPU_NO_COOP_MATRIX=1 skips the check)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_difference_is_scaled_and_refuses_nan() {
        assert_eq!(relative_difference(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        let d = relative_difference(&[3.0, 4.0], &[3.0, 4.5]);
        assert!((d - 0.5 / (3.0f64 * 3.0 + 4.5 * 4.5).sqrt()).abs() < 1e-12, "{d}");
        assert_eq!(relative_difference(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(relative_difference(&[0.0], &[0.0]), 0.0);
        assert_eq!(relative_difference(&[1e-30], &[0.0]), f64::INFINITY);
        assert_eq!(relative_difference(&[1.0], &[1.0, 2.0]), f64::INFINITY);
    }
}
