//! Generation runs: the state, the sampler and the tokens drawn but not yet fed, for one
//! sequence (`Generation`) or several stepped together (`BatchGeneration`).
//!
//! Each step feeds what is pending, draws the next token from the last logits and makes
//! it the pending one, all before returning. The caller takes a drawn token with
//! `record` (which also lists it in `given`); `finish` feeds the pending token only if it
//! was taken. So whatever interrupts the caller (Ctrl-C in Python, arriving as a step
//! returns; an early `break`) finds a consistent run: after `finish` the state holds the
//! prompt and exactly the tokens in `given`, as listed in `fed`.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::interrupt::Interrupt;
use crate::model::{Model, State, Want};
use crate::sampler::Sampler;

pub struct Generation {
    model: Arc<Model>,
    state: State,
    sampler: Sampler,
    pending: Vec<u32>,
    fed: Vec<u32>,
    given: Vec<u32>,
    /// `pending` holds a drawn token the caller has not taken (recorded).
    untaken: bool,
}

impl Generation {
    /// `prompt` (non-empty) is fed by the first step.
    pub fn new(model: Arc<Model>, state: State, sampler: Sampler, prompt: Vec<u32>) -> Generation {
        Generation { model, state, sampler, pending: prompt, fed: Vec::new(), given: Vec::new(), untaken: false }
    }

    /// Feeds the pending tokens and draws the next one (penalised, not yet recorded).
    /// On error nothing changes: the pending tokens stay pending.
    pub fn step(&mut self) -> Result<u32> {
        self.step_with(Interrupt::NONE)
    }

    /// `step`, asking `interrupt` between the submissions of a long prompt. Interrupted,
    /// the state is as before and the pending tokens are dropped: nothing was produced
    /// from them, so `finish` does not feed them either.
    pub fn step_with(&mut self, interrupt: Interrupt) -> Result<u32> {
        let result = self.model.forward_batch_with(&[(&self.state, &self.pending)], Want::Last, interrupt);
        if matches!(result, Err(Error::Interrupted)) {
            self.pending.clear();
            self.untaken = false;
        }
        let mut logits = result?;
        self.sampler.apply_penalties(&mut logits);
        let token = self.sampler.sample(&logits);
        self.fed.append(&mut self.pending);
        self.pending.push(token);
        self.untaken = true;
        Ok(token)
    }

    /// The caller takes the drawn `token`: counted for the penalties (`token_bytes`
    /// decides the whitespace/digit rule) and listed in `given`.
    pub fn record(&mut self, token: u32, token_bytes: &[u8]) {
        self.sampler.record(token, token_bytes);
        self.given.push(token);
        self.untaken = false;
    }

    /// The tokens the caller has taken, in order.
    pub fn given(&self) -> &[u32] {
        &self.given
    }

    /// Drops the pending token unfed (a stop token).
    pub fn discard_pending(&mut self) {
        self.pending.clear();
    }

    /// Feeds whatever is pending (no logits computed), except a drawn token the caller
    /// never took. Safe to call more than once.
    pub fn finish(&mut self) -> Result<()> {
        if self.untaken {
            self.pending.clear();
            self.untaken = false;
        }
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

/// One sequence of a `BatchGeneration`.
struct Member {
    state: State,
    sampler: Sampler,
    pending: Vec<u32>,
    fed: Vec<u32>,
    given: Vec<u32>,
    /// `pending` holds a drawn token the caller has not taken (recorded).
    untaken: bool,
    /// Takes no more steps (stopped or given up by the caller); its pending token, if
    /// any, is still fed by `finish`.
    done: bool,
}

/// Several generation runs stepped together: each step feeds every live sequence's
/// pending tokens in one `forward_batch` call (the weights read once for all of them),
/// then draws each one's next token with its own sampler. The same consistency rule as
/// `Generation`: after `finish`, each state holds exactly its `fed` tokens.
pub struct BatchGeneration {
    model: Arc<Model>,
    members: Vec<Member>,
}

impl BatchGeneration {
    /// One (state, sampler, non-empty prompt) per sequence.
    pub fn new(model: Arc<Model>, runs: Vec<(State, Sampler, Vec<u32>)>) -> BatchGeneration {
        let members = runs
            .into_iter()
            .map(|(state, sampler, prompt)| Member { state, sampler, pending: prompt, fed: Vec::new(), given: Vec::new(), untaken: false, done: false })
            .collect();
        BatchGeneration { model, members }
    }

    /// Feeds the pending tokens of every live sequence and draws each one's next token;
    /// None for sequences that are done. On error nothing changes.
    pub fn step(&mut self) -> Result<Vec<Option<u32>>> {
        self.step_with(Interrupt::NONE)
    }

    /// `step`, asking `interrupt` between submissions; interrupted, as `Generation::step_with`.
    pub fn step_with(&mut self, interrupt: Interrupt) -> Result<Vec<Option<u32>>> {
        let live: Vec<usize> = (0..self.members.len()).filter(|&i| !self.members[i].done).collect();
        let mut drawn = vec![None; self.members.len()];
        if live.is_empty() {
            return Ok(drawn);
        }
        let batch: Vec<(&State, &[u32])> = live.iter().map(|&i| (&self.members[i].state, self.members[i].pending.as_slice())).collect();
        let result = self.model.forward_batch_with(&batch, Want::Last, interrupt);
        if matches!(result, Err(Error::Interrupted)) {
            for &i in &live {
                self.members[i].pending.clear();
                self.members[i].untaken = false;
            }
        }
        let logits = result?;
        let v = self.model.config.vocab_size;
        for (row, &i) in logits.chunks_exact(v).zip(&live) {
            let m = &mut self.members[i];
            let mut row = row.to_vec();
            m.sampler.apply_penalties(&mut row);
            let token = m.sampler.sample(&row);
            m.fed.append(&mut m.pending);
            m.pending.push(token);
            m.untaken = true;
            drawn[i] = Some(token);
        }
        Ok(drawn)
    }

    /// The caller takes sequence `i`'s drawn `token` (as `Generation::record`).
    pub fn record(&mut self, i: usize, token: u32, token_bytes: &[u8]) {
        let m = &mut self.members[i];
        m.sampler.record(token, token_bytes);
        m.given.push(token);
        m.untaken = false;
    }

    /// The tokens the caller has taken from sequence `i`.
    pub fn given(&self, i: usize) -> &[u32] {
        &self.members[i].given
    }

    /// Sequence `i` takes no more steps; `feed_pending` false drops its drawn token unfed
    /// (a stop token), true leaves it for `finish` to feed (if it was taken).
    pub fn stop(&mut self, i: usize, feed_pending: bool) {
        let m = &mut self.members[i];
        m.done = true;
        if !feed_pending {
            m.pending.clear();
        }
    }

    /// Feeds every sequence's pending tokens, in one call, no logits, except drawn tokens
    /// the caller never took. Safe to repeat.
    pub fn finish(&mut self) -> Result<()> {
        for m in &mut self.members {
            if m.untaken {
                m.pending.clear();
                m.untaken = false;
            }
        }
        let batch: Vec<(&State, &[u32])> = self.members.iter().filter(|m| !m.pending.is_empty()).map(|m| (&m.state, m.pending.as_slice())).collect();
        if batch.is_empty() {
            return Ok(());
        }
        self.model.forward_batch(&batch, Want::None)?;
        for m in &mut self.members {
            m.fed.append(&mut m.pending);
            m.done = true;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Tokens fed into sequence `i`'s state so far.
    pub fn fed(&self, i: usize) -> &[u32] {
        &self.members[i].fed
    }
}
