//! One generation run: the state, the sampler and the tokens drawn but not yet fed.
//!
//! Each step feeds what is pending, draws the next token from the last logits and makes
//! it the pending one, all before returning, so whatever interrupts the caller between
//! steps (Ctrl-C in Python, an early `break`) finds a consistent run: `finish` feeds the
//! pending token and the state then holds exactly the tokens listed in `fed`.

use std::sync::Arc;

use crate::error::Result;
use crate::model::{Model, State, Want};
use crate::sampler::Sampler;

pub struct Generation {
    model: Arc<Model>,
    state: State,
    sampler: Sampler,
    pending: Vec<u32>,
    fed: Vec<u32>,
}

impl Generation {
    /// `prompt` (non-empty) is fed by the first step.
    pub fn new(model: Arc<Model>, state: State, sampler: Sampler, prompt: Vec<u32>) -> Generation {
        Generation { model, state, sampler, pending: prompt, fed: Vec::new() }
    }

    /// Feeds the pending tokens and draws the next one (penalised, not yet recorded).
    /// On error nothing changes: the pending tokens stay pending.
    pub fn step(&mut self) -> Result<u32> {
        let mut logits = self.model.forward(&self.state, &self.pending, Want::Last)?;
        self.sampler.apply_penalties(&mut logits);
        let token = self.sampler.sample(&logits);
        self.fed.append(&mut self.pending);
        self.pending.push(token);
        Ok(token)
    }

    /// Counts `token` for the penalties; `token_bytes` decides the whitespace/digit rule.
    pub fn record(&mut self, token: u32, token_bytes: &[u8]) {
        self.sampler.record(token, token_bytes);
    }

    /// Drops the pending token unfed (a stop token).
    pub fn discard_pending(&mut self) {
        self.pending.clear();
    }

    /// Feeds whatever is pending (no logits computed). Safe to call more than once.
    pub fn finish(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            self.model.forward(&self.state, &self.pending, Want::None)?;
            self.fed.append(&mut self.pending);
        }
        Ok(())
    }

    /// Tokens fed into the state so far (the prompt's included).
    pub fn fed(&self) -> &[u32] {
        &self.fed
    }
}
