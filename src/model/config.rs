//! Model dimensions, read from the checkpoint's tensors (never from its file name).

use crate::error::{Error, Result};
use crate::loader::Checkpoint;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub head_size: usize,
    pub vocab_size: usize,
    pub ffn_size: usize,
    /// Widths of the decay, in-context-rate, value-residual and gate low-rank paths.
    pub lora_w: usize,
    pub lora_a: usize,
    pub lora_v: usize,
    pub lora_g: usize,
}

fn shape(ck: &dyn Checkpoint, name: &str) -> Result<Vec<usize>> {
    ck.info(name)
        .map(|i| i.shape)
        .ok_or_else(|| Error::load(ck.path(), format!("missing tensor {name:?}")))
}

/// Says what a file that is not an RWKV-7 checkpoint looks like.
fn describe_foreign(names: &[String]) -> String {
    let has = |suffix: &str| names.iter().any(|n| n.ends_with(suffix));
    if has("att.time_faaaa") || has("att.time_maa_x") {
        "an RWKV-6 checkpoint (it has att.time_maa_x / time_faaaa)".into()
    } else if has("att.time_first") && has("att.time_decay") && has("att.time_mix_k") {
        if has("att.ln_x.weight") { "an RWKV-5 checkpoint (it has att.time_first and ln_x)".into() } else { "an RWKV-4 checkpoint (it has att.time_first)".into() }
    } else if has("embed_tokens.weight") || has("self_attn.q_proj.weight") {
        "a transformer checkpoint (Hugging Face names such as embed_tokens)".into()
    } else if names.is_empty() {
        "an empty checkpoint".into()
    } else {
        format!("an unknown model (first tensors: {})", names.iter().take(4).cloned().collect::<Vec<_>>().join(", "))
    }
}

/// The low-rank width of a path whose first matrix is `[C, D]` officially, `[D, C]` when
/// converted for web-rwkv. A square matrix is taken in the official orientation.
fn lora_width(ck: &dyn Checkpoint, name: &str, c: usize) -> Result<usize> {
    let s = shape(ck, name)?;
    match s.as_slice() {
        [a, b] if *a == c => Ok(*b),
        [a, b] if *b == c => Ok(*a),
        _ => Err(Error::load(ck.path(), format!("{name} has shape {s:?}; expected [{c}, D] or [D, {c}]"))),
    }
}

impl Config {
    pub fn from_checkpoint(ck: &dyn Checkpoint) -> Result<Config> {
        let names = ck.names();
        if !names.iter().any(|n| n == "blocks.0.att.r_k") || !names.iter().any(|n| n == "emb.weight") {
            return Err(Error::load(
                ck.path(),
                format!("not an RWKV-7 checkpoint: this looks like {}", describe_foreign(&names)),
            ));
        }
        let emb = shape(ck, "emb.weight")?;
        let r_k = shape(ck, "blocks.0.att.r_k")?;
        let (vocab_size, n_embd) = match emb.as_slice() {
            [v, c] => (*v, *c),
            _ => return Err(Error::load(ck.path(), format!("emb.weight has shape {emb:?}; expected [vocab, n_embd]"))),
        };
        let (n_head, head_size) = match r_k.as_slice() {
            [h, n] => (*h, *n),
            _ => return Err(Error::load(ck.path(), format!("blocks.0.att.r_k has shape {r_k:?}; expected [heads, head_size]"))),
        };
        if n_head * head_size != n_embd {
            return Err(Error::load(ck.path(), format!("r_k is [{n_head}, {head_size}] but n_embd is {n_embd}")));
        }
        if !head_size.is_power_of_two() || !(4..=256).contains(&head_size) {
            return Err(Error::load(ck.path(), format!("head size {head_size} is not supported (a power of two from 4 to 256)")));
        }
        let n_layer = names
            .iter()
            .filter_map(|n| n.strip_prefix("blocks.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map(|m| m + 1)
            .unwrap_or(0);
        // A saved quantized model holds it as codes and scales.
        let ffn = super::saved::matrix_shape(ck, "blocks.0.ffn.key.weight")?
            .ok_or_else(|| Error::load(ck.path(), "missing tensor \"blocks.0.ffn.key.weight\""))?;
        let ffn_size = match ffn.as_slice() {
            [f, c] if *c == n_embd => *f,
            _ => return Err(Error::load(ck.path(), format!("blocks.0.ffn.key.weight has shape {ffn:?}; expected [F, {n_embd}]"))),
        };
        // v1 is unused in block 0, so read its width from block 1 when there is one.
        let v_block = if n_layer > 1 { 1 } else { 0 };
        let config = Config {
            n_layer,
            n_embd,
            n_head,
            head_size,
            vocab_size,
            ffn_size,
            lora_w: lora_width(ck, "blocks.0.att.w1", n_embd)?,
            lora_a: lora_width(ck, "blocks.0.att.a1", n_embd)?,
            lora_v: lora_width(ck, &format!("blocks.{v_block}.att.v1"), n_embd)?,
            lora_g: lora_width(ck, "blocks.0.att.g1", n_embd)?,
        };
        for (what, d) in [("n_embd", n_embd), ("ffn", ffn_size), ("w1", config.lora_w), ("a1", config.lora_a), ("v1", config.lora_v), ("g1", config.lora_g)] {
            if d % 8 != 0 {
                return Err(Error::load(ck.path(), format!("{what} width {d} is not a multiple of 8; the kernels read matrix rows 8 values at a time (every published RWKV-7 model qualifies)")));
            }
        }
        Ok(config)
    }

    /// The low-rank hidden values of one token: w, a, v and g widths together.
    pub fn lora_sum(&self) -> usize {
        self.lora_w + self.lora_a + self.lora_v + self.lora_g
    }

    /// The official low-rank widths for a model `n_embd` wide (RWKV-LM's RWKV-7 training
    /// code): multiples of 32 around 1.8 sqrt(C), 1.8 sqrt(C), 1.3 sqrt(C), 0.6 C^0.8.
    pub fn official(n_layer: usize, n_embd: usize, vocab_size: usize) -> Config {
        let width = |factor: f64, power: f64| -> usize {
            let d = (factor * (n_embd as f64).powf(power) / 32.0).round() as usize * 32;
            d.max(32)
        };
        Config {
            n_layer,
            n_embd,
            n_head: n_embd / 64,
            head_size: 64,
            vocab_size,
            ffn_size: 4 * n_embd,
            lora_w: width(1.8, 0.5),
            lora_a: width(1.8, 0.5),
            lora_v: width(1.3, 0.5),
            lora_g: width(0.6, 0.8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_widths_match_published_models() {
        // RWKV7 0.1B (768 wide) and 2.9B (2560 wide).
        let c = Config::official(12, 768, 65536);
        assert_eq!((c.lora_w, c.lora_a, c.lora_v, c.lora_g), (64, 64, 32, 128));
        let c = Config::official(32, 2560, 65536);
        assert_eq!((c.lora_w, c.lora_a, c.lora_v, c.lora_g), (96, 96, 64, 320));
    }
}
