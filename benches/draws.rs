//! Host time of one decode step's draws (penalties, softmax, top-p, the draw) at a
//! 65536-token vocabulary: one after another against side by side (`draw_threads`), the
//! two alternating, A B A B. `cargo bench --bench draws`.
//!
//! The step's other host work and the GPU's are not in it: this is the share that
//! spreading the draws over the cores removes.

use std::time::Instant;

use rwkv_gpu::generation::{draw_all, draw_threads, Draw};
use rwkv_gpu::sampler::{Sampler, SamplingOptions};

const VOCAB: usize = 65536;
const PAIRS: usize = 15;

fn logits(rows: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut x = seed | 1;
    (0..rows)
        .map(|_| {
            (0..VOCAB)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // A spread like a language model's: most logits far below the top few.
                    ((x >> 40) as f32 / (1u64 << 24) as f32).powi(8) * 30.0 - 10.0
                })
                .collect()
        })
        .collect()
}

/// Seconds for one step's draws of `rows` (fresh copies of the logits) on `threads`.
fn step(samplers: &mut [Sampler], rows: &[Vec<f32>], threads: usize, top_logprobs: Option<usize>) -> f64 {
    let mut rows = rows.to_vec();
    let start = Instant::now();
    let draws: Vec<Draw<'_>> = samplers
        .iter_mut()
        .zip(rows.iter_mut())
        .map(|(sampler, row)| Draw { sampler, logits: row, top_logprobs })
        .collect();
    std::hint::black_box(draw_all(draws, threads));
    start.elapsed().as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    println!(
        "| sequences | logprobs | threads | in turn ms | side by side ms | ratio (median of {PAIRS} pairs) |"
    );
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for batch in [1usize, 4, 16] {
        for top_logprobs in [None, Some(5)] {
            let rows = logits(batch, 7 + batch as u64);
            let samplers = || -> Vec<Sampler> {
                (0..batch as u64)
                    .map(|i| {
                        Sampler::new(SamplingOptions { seed: Some(i), ..Default::default() }, VOCAB).unwrap()
                    })
                    .collect()
            };
            let (mut a, mut b) = (samplers(), samplers());
            let threads = draw_threads(batch, VOCAB);
            let (mut alone, mut together, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            step(&mut a, &rows, 1, top_logprobs); // warm-up
            step(&mut b, &rows, threads, top_logprobs);
            for _ in 0..PAIRS {
                let one = step(&mut a, &rows, 1, top_logprobs);
                let many = step(&mut b, &rows, threads, top_logprobs);
                alone.push(one);
                together.push(many);
                ratios.push(many / one);
            }
            println!(
                "| {batch} | {} | {threads} | {:.2} | {:.2} | {:.2} |",
                if top_logprobs.is_some() { "5" } else { "-" },
                median(alone) * 1e3,
                median(together) * 1e3,
                median(ratios)
            );
        }
    }
}
