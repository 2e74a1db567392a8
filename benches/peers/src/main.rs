//! web-rwkv measured with rwkv-gpu's bench definitions, for `compare.py`:
//!
//! - ppP: P random tokens, logits of the last token only, fed in chunks of
//!   `--token-chunk-size`;
//! - tgN: N single-token steps, each taking the next token as the argmax of the full
//!   logits on the host (web-rwkv's `infer` already returns them on the host);
//! - one warm-up run, then `--repetitions` timed runs. web-rwkv keeps one state per
//!   runtime, so runs continue from the state the last one left (speed does not depend
//!   on the state's values).
//!
//! Prints one JSON object per test on stdout: {"test", "tokens_per_s": [...]}.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use half::f16;
use web_rwkv::context::{Context, ContextBuilder};
use web_rwkv::runtime::infer::{Rnn, RnnInput, RnnInputBatch, RnnOption};
use web_rwkv::runtime::loader::Loader;
use web_rwkv::runtime::model::{ContextAutoLimits, ModelBuilder, ModelVersion, Quant};
use web_rwkv::runtime::{v7, Runtime, TokioRuntime};

struct Args {
    model: PathBuf,
    adapter: Option<String>,
    quant: usize,
    quant_nf4: usize,
    chunk: usize,
    prefill: usize,
    generate: usize,
    repetitions: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { model: PathBuf::new(), adapter: None, quant: 0, quant_nf4: 0, chunk: 128, prefill: 512, generate: 128, repetitions: 5 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = PathBuf::from(value()?),
            "--adapter" => args.adapter = Some(value()?),
            "--quant" => args.quant = value()?.parse()?,
            "--quant-nf4" => args.quant_nf4 = value()?.parse()?,
            "--token-chunk-size" => args.chunk = value()?.parse()?,
            "-p" => args.prefill = value()?.parse()?,
            "-n" => args.generate = value()?.parse()?,
            "-r" => args.repetitions = value()?.parse()?,
            other => bail!("unknown argument {other:?} (--model --adapter --quant --quant-nf4 --token-chunk-size -p -n -r)"),
        }
    }
    if args.model.as_os_str().is_empty() {
        bail!("--model is required");
    }
    Ok(args)
}

/// The adapter whose name contains `choice` (case-insensitive), else the first
/// high-performance one.
async fn adapter(choice: Option<&str>) -> Result<wgpu::Adapter> {
    let instance = wgpu::Instance::default();
    let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
    if let Some(choice) = choice {
        let want = choice.to_lowercase();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&want))
            .with_context(|| format!("no adapter named like {choice:?}"));
    }
    instance
        .request_adapter(&wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() })
        .await
        .context("no adapter")
}

fn argmax(values: &[f32]) -> u16 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u16
}

/// Feeds `tokens` in chunks until the last token's logits come back; returns them.
async fn feed(runtime: &dyn Runtime<Rnn>, tokens: Vec<u16>, chunk: usize) -> Result<Vec<f32>> {
    let mut input = RnnInput::new(vec![RnnInputBatch::new(tokens, RnnOption::Last)], chunk);
    loop {
        let (rest, output) = runtime.infer(input).await?;
        let logits = output[0].0.clone();
        if logits.size() > 0 {
            return Ok(logits.to_vec());
        }
        input = rest;
    }
}

fn report(test: &str, rates: &[f64]) {
    let list = rates.iter().map(|r| format!("{r:.4}")).collect::<Vec<_>>().join(", ");
    println!("{{\"test\": \"{test}\", \"tokens_per_s\": [{list}]}}");
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let file = std::fs::File::open(&args.model).with_context(|| format!("opening {}", args.model.display()))?;
    // SAFETY: read-only mapping of a file nobody changes during the run.
    let data = unsafe { memmap2::Mmap::map(&file)? };
    let tensors = safetensors::SafeTensors::deserialize(&data)?;
    let info = Loader::info(&tensors)?;
    if info.version != ModelVersion::V7 {
        bail!("{} is not an RWKV-7 model", args.model.display());
    }
    let adapter = adapter(args.adapter.as_deref()).await?;
    let adapter_name = adapter.get_info().name;
    let context: Context = ContextBuilder::new(adapter).auto_limits(&info).build().await?;
    let quant: HashMap<usize, Quant> = (0..args.quant)
        .map(|layer| (layer, Quant::Int8))
        .chain((0..args.quant_nf4).map(|layer| (layer, Quant::NF4)))
        .collect();
    let model = ModelBuilder::new(&context, tensors).quant(quant).build_v7().await?;
    let runtime: Box<dyn Runtime<Rnn>> = Box::new(TokioRuntime::new(v7::Bundle::<f16>::new(model, 1)).await);
    eprintln!("web-rwkv on {adapter_name}, token chunk size {}", args.chunk);

    let vocab = info.num_vocab as u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random_tokens = |n: usize| -> Vec<u16> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % vocab) as u16
            })
            .collect()
    };

    let mut rates = Vec::new();
    for run in 0..=args.repetitions {
        let tokens = random_tokens(args.prefill);
        let start = Instant::now();
        feed(runtime.as_ref(), tokens, args.chunk).await?;
        if run > 0 {
            rates.push(args.prefill as f64 / start.elapsed().as_secs_f64());
        }
    }
    report(&format!("pp{}", args.prefill), &rates);

    let mut rates = Vec::new();
    for run in 0..=args.repetitions {
        let start = Instant::now();
        let mut token = 0u16;
        for _ in 0..args.generate {
            token = argmax(&feed(runtime.as_ref(), vec![token], args.chunk).await?);
        }
        if run > 0 {
            rates.push(args.generate as f64 / start.elapsed().as_secs_f64());
        }
    }
    report(&format!("tg{}", args.generate), &rates);
    Ok(())
}
