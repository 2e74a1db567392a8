//! Model dimensions, read from the checkpoint's tensors (never from its file name) by
//! `schema::check`.

use crate::error::Result;
use crate::loader::Checkpoint;

/// The head size of every published RWKV-7 model, and so of `Config::official`.
pub const OFFICIAL_HEAD_SIZE: usize = 64;

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
    /// RWKV-7a DeepEmbed: the rank r of each layer's channel-mix modulation (its tables
    /// are r x r wide per token); 0 for a plain RWKV-7 model.
    pub deep_embed_rank: usize,
}

impl Config {
    /// The dimensions of a checkpoint, once it has passed the schema (`schema::check`).
    pub fn from_checkpoint(ck: &dyn Checkpoint) -> Result<Config> {
        crate::schema::check(ck).map(|c| c.config)
    }

    pub fn deep_embed(&self) -> bool {
        self.deep_embed_rank > 0
    }

    /// Values per token of a DeepEmbed table (r x r).
    pub fn deep_embed_width(&self) -> usize {
        self.deep_embed_rank * self.deep_embed_rank
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
            n_head: n_embd / OFFICIAL_HEAD_SIZE,
            head_size: OFFICIAL_HEAD_SIZE,
            vocab_size,
            ffn_size: 4 * n_embd,
            lora_w: width(1.8, 0.5),
            lora_a: width(1.8, 0.5),
            lora_v: width(1.3, 0.5),
            lora_g: width(0.6, 0.8),
            deep_embed_rank: 0,
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
