//! The one generation loop: sequences stepped together (`Batch`). `Model.generate` is a
//! batch of one, `complete_batch` a batch of n, and the serving Engine a batch that
//! sequences join and leave between steps.
//!
//! Each step feeds every live sequence's pending tokens in one forward call (the weights
//! read once for all), and each sequence whose pending tokens were all fed draws its next
//! token with its own sampler and makes it the pending one: on the device in the same
//! submission (`Model::forward_draw_with`, one token read back per sequence), or on the
//! host from the logits when a sequence wants log-probabilities or the model draws on
//! the host (`Model::draws_on_device`). A step may cap the
//! prompt tokens it feeds (`prefill_budget`): a long prompt is then fed over several
//! steps, interleaved with the others' decoding, and draws once it is all in.
//!
//! The caller takes a drawn token with `record` (which lists it in `given`); `finish`
//! feeds the pending token only if it was taken. Whatever interrupts the caller (Ctrl-C,
//! an early `break`, a cancelled request) finds a consistent sequence: after `finish` its
//! state holds exactly the tokens in `fed`: the prompt, then the tokens in `given`.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::interrupt::Interrupt;
use crate::model::{Model, State, Want};
use crate::sampler::{DeviceDraw, Sampler};

/// A sequence's handle in its batch (never reused within one batch).
pub type SeqId = u64;

/// What a step produced for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub enum Stepped {
    /// Drew `token` (not yet taken). With logprobs asked for: the token's log-probability
    /// and the most likely tokens' under the penalised logits at temperature 1.
    Drew { id: SeqId, token: u32, logprob: Option<f32>, top: Vec<(u32, f32)> },
    /// Fed its prompt up to one of its pause points (`at` tokens of it); it goes on with
    /// the rest at the next step. The state then is the one after `prompt[..at]`.
    Paused { id: SeqId, at: usize },
}

struct Member {
    id: SeqId,
    state: State,
    sampler: Sampler,
    /// Tokens to feed, in order: the prompt at first, then the drawn token.
    pending: Vec<u32>,
    /// Prompt tokens fed so far, and the prompt lengths (ascending, inside the prompt)
    /// at which to pause and report.
    prompt_fed: usize,
    prompt_len: usize,
    pauses: Vec<usize>,
    fed: Vec<u32>,
    given: Vec<u32>,
    /// `pending` holds a drawn token the caller has not taken (recorded).
    untaken: bool,
    /// Takes no more steps (stopped by the caller); pending tokens, if any, are still
    /// fed by `finish` (a taken drawn token only).
    done: bool,
    /// How many alternatives to report with each draw (None: no log-probabilities).
    top_logprobs: Option<usize>,
}

impl Member {
    fn live(&self) -> bool {
        !self.done && !self.pending.is_empty()
    }

    /// Still feeding its prompt (nothing drawn yet).
    fn reading_prompt(&self) -> bool {
        self.prompt_fed < self.prompt_len
    }
}

pub struct Batch {
    model: Arc<Model>,
    members: Vec<Member>,
    next_id: SeqId,
    /// The most pending tokens a step feeds over all sequences that are reading a prompt
    /// (a sequence decoding feeds its one token regardless); 0: no limit.
    prefill_budget: usize,
}

/// The most alternatives a draw reports (OpenAI's `top_logprobs` goes to 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Batch {
    pub fn new(model: Arc<Model>) -> Batch {
        Batch { model, members: Vec::new(), next_id: 0, prefill_budget: 0 }
    }

    pub fn set_prefill_budget(&mut self, tokens: usize) {
        self.prefill_budget = tokens;
    }

    /// Adds a sequence over `state`, to feed `prompt` (non-empty) and then draw, pausing
    /// after each prompt length in `pauses` (a step reports `Paused` there: the caller may
    /// keep that state). The sampler is used as given (reset it for a fresh run). Checked
    /// here, once: the state is this model's and in no other sequence of the batch, the
    /// tokens are in the vocabulary, the pauses inside the prompt.
    pub fn add(
        &mut self,
        state: State,
        sampler: Sampler,
        prompt: Vec<u32>,
        pauses: Vec<usize>,
        top_logprobs: Option<usize>,
    ) -> Result<SeqId> {
        self.model.check_state(&state)?;
        self.model.check_tokens(&prompt)?;
        let mut pauses = pauses;
        pauses.sort_unstable();
        pauses.dedup();
        if let Some(&p) = pauses.iter().find(|&&p| p == 0 || p >= prompt.len()) {
            return Err(Error::Invalid(format!(
                "pause point {p} must be inside the prompt of {} tokens (1..{})",
                prompt.len(),
                prompt.len()
            )));
        }
        if sampler.vocab_size() != self.model.config.vocab_size {
            return Err(Error::Shape(format!(
                "the sampler is for a vocabulary of {}; this model has {}",
                sampler.vocab_size(),
                self.model.config.vocab_size
            )));
        }
        if let Some(n) = top_logprobs {
            if n > MAX_TOP_LOGPROBS {
                return Err(Error::Invalid(format!(
                    "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"
                )));
            }
        }
        if self.members.iter().any(|m| Arc::ptr_eq(&m.state.0, &state.0)) {
            return Err(Error::State(
                "this State is already used by a sequence of the batch; give each its own".into(),
            ));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.members.push(Member {
            id,
            state,
            sampler,
            prompt_len: prompt.len(),
            pending: prompt,
            prompt_fed: 0,
            pauses,
            fed: Vec::new(),
            given: Vec::new(),
            untaken: false,
            done: false,
            top_logprobs,
        });
        Ok(id)
    }

    fn member(&self, id: SeqId) -> Result<&Member> {
        self.members
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| Error::State(format!("sequence {id} is not in this batch")))
    }

    fn member_mut(&mut self, id: SeqId) -> Result<&mut Member> {
        self.members
            .iter_mut()
            .find(|m| m.id == id)
            .ok_or_else(|| Error::State(format!("sequence {id} is not in this batch")))
    }

    /// Feeds each live sequence's pending tokens (prompts within the budget) in one call,
    /// then draws for each sequence that fed all it had. On an error or an interrupt
    /// nothing changes: the forward call leaves the states as they were, and the tokens
    /// stay pending (a taken drawn token is then still fed by `finish`, a prompt not all
    /// in still is not). The one exception is a device whose sampler gives a token
    /// outside the vocabulary: the tokens are fed by then, so the step's sequences keep
    /// them (`fed`) and stop.
    pub fn step_with(&mut self, interrupt: Interrupt) -> Result<Vec<Stepped>> {
        // How many pending tokens each member feeds now: a decoding one its single token,
        // prompts in order of arrival while the budget lasts.
        let mut take = vec![0usize; self.members.len()];
        let mut budget = if self.prefill_budget == 0 { usize::MAX } else { self.prefill_budget };
        for (i, m) in self.members.iter().enumerate().filter(|(_, m)| m.live()) {
            if m.reading_prompt() {
                // Up to the next pause point, within the budget.
                let to_pause = m.pauses.first().map_or(usize::MAX, |&p| p - m.prompt_fed);
                take[i] = m.pending.len().min(to_pause).min(budget);
                budget -= take[i];
            } else {
                take[i] = m.pending.len();
            }
        }
        let fed: Vec<usize> = (0..self.members.len()).filter(|&i| take[i] > 0).collect();
        if fed.is_empty() {
            return Ok(Vec::new());
        }
        // Who draws this step: those that feed all they have. The device draws for them
        // unless one wants log-probabilities (they need the logits on the host).
        let draws_now: Vec<bool> = (0..self.members.len())
            .map(|i| take[i] > 0 && take[i] == self.members[i].pending.len())
            .collect();
        let drawing: Vec<usize> = (0..self.members.len()).filter(|&i| draws_now[i]).collect();
        // (Nor when their penalty entries would not fit one binding: a long generation on
        // a device with small bindings.)
        let device_draws: Option<Vec<Option<DeviceDraw>>> = (!drawing.is_empty()
            && self.model.draws_on_device()
            && drawing.iter().all(|&i| self.members[i].top_logprobs.is_none()))
        .then(|| fed.iter().map(|&i| draws_now[i].then(|| self.members[i].sampler.device_draw())).collect())
        .filter(|draws: &Vec<Option<DeviceDraw>>| {
            self.model.draw_entries_fit(draws.iter().flatten().map(|d| d.entries.len()).sum())
        });
        let on_device = device_draws.is_some();
        let batch: Vec<(&State, &[u32])> =
            fed.iter().map(|&i| (&self.members[i].state, &self.members[i].pending[..take[i]])).collect();
        let drawn: Vec<Drawn> = if let Some(draws) = &device_draws {
            let refs: Vec<Option<&DeviceDraw>> = draws.iter().map(Option::as_ref).collect();
            let tokens = self.model.forward_draw_with(&batch, &refs, interrupt)?;
            let vocab = self.model.config.vocab_size as u32;
            let drew = fed.iter().zip(tokens).filter(|(&i, _)| draws_now[i]);
            // Only a broken device gives no token in the vocabulary: the states have
            // advanced, so the bookkeeping below still runs, and the step fails after it.
            let token = |t: Option<u32>| t.filter(|&t| t < vocab).unwrap_or(u32::MAX);
            drew.map(|(_, t)| (token(t), None, Vec::new())).collect()
        } else {
            let want = if drawing.is_empty() { Want::None } else { Want::Last };
            let mut logits = self.model.forward_batch_with(&batch, want, interrupt)?;
            // Every draw at once: each sequence draws from its own row with its own
            // sampler, so the draws may run side by side.
            let v = self.model.config.vocab_size;
            let draws: Vec<Draw<'_>> = self
                .members
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| take[*i] > 0)
                .zip(logits.chunks_mut(v))
                .filter(|((i, _), _)| draws_now[*i])
                .map(|((_, m), logits)| Draw {
                    sampler: &mut m.sampler,
                    logits,
                    top_logprobs: m.top_logprobs,
                })
                .collect();
            let threads = draw_threads(draws.len(), v);
            draw_all(draws, threads)
        };
        debug_assert_eq!(drawn.len(), drawing.len());
        let mut events: Vec<(usize, Stepped)> = Vec::new();
        for &i in &fed {
            let m = &mut self.members[i];
            if m.reading_prompt() {
                m.prompt_fed += take[i];
            }
            m.fed.extend(m.pending.drain(..take[i]));
            m.untaken = false;
            if m.pauses.first() == Some(&m.prompt_fed) {
                m.pauses.remove(0);
                events.push((i, Stepped::Paused { id: m.id, at: m.prompt_fed }));
            }
        }
        if drawn.iter().any(|d| d.0 == u32::MAX) {
            // Their states hold `fed`; with no token to draw from, they take no more steps.
            drawing.iter().for_each(|&i| self.members[i].done = true);
            return Err(Error::Device("the device's sampler gave a token outside the vocabulary".into()));
        }
        for (&i, (token, logprob, top)) in drawing.iter().zip(drawn) {
            let m = &mut self.members[i];
            if on_device {
                m.sampler.drew_on_device();
            }
            m.pending.push(token);
            m.untaken = true;
            events.push((i, Stepped::Drew { id: m.id, token, logprob, top }));
        }
        // In the order fed (a sequence pauses or draws, never both).
        events.sort_by_key(|&(i, _)| i);
        Ok(events.into_iter().map(|(_, event)| event).collect())
    }

    pub fn step(&mut self) -> Result<Vec<Stepped>> {
        self.step_with(Interrupt::NONE)
    }

    /// The caller takes sequence `id`'s drawn `token`: counted for the penalties
    /// (`token_bytes` decides the whitespace/digit rule) and listed in `given`.
    pub fn record(&mut self, id: SeqId, token: u32, token_bytes: &[u8]) -> Result<()> {
        let m = self.member_mut(id)?;
        if !m.untaken || m.pending.last() != Some(&token) {
            return Err(Error::State(format!("token {token} is not sequence {id}'s drawn token")));
        }
        m.sampler.record(token, token_bytes)?;
        m.given.push(token);
        m.untaken = false;
        Ok(())
    }

    /// Sequence `id` takes no more steps; `feed_pending` false drops what is pending
    /// (a stop token), true leaves a taken token for `finish` to feed.
    pub fn stop(&mut self, id: SeqId, feed_pending: bool) -> Result<()> {
        let m = self.member_mut(id)?;
        m.done = true;
        if !feed_pending {
            m.pending.clear();
            m.untaken = false;
        }
        Ok(())
    }

    /// Ends the sequences in `ids` (all: None): each feeds the drawn token the caller took,
    /// if any, all in one call, no logits. A drawn token never taken is dropped, and a
    /// prompt not all in is fed no further: its state holds the part in `fed` (feeding
    /// the rest of a long prompt here would hold a cancelled request's batch, or a
    /// Ctrl-C, for all of it). They take no more steps. On an error or an interrupt
    /// nothing changes. Safe to repeat.
    pub fn finish_with(&mut self, ids: Option<&[SeqId]>, interrupt: Interrupt) -> Result<()> {
        for &id in ids.unwrap_or_default() {
            self.member(id)?;
        }
        let chosen = |m: &Member| ids.is_none_or(|ids| ids.contains(&m.id));
        let feeds = |m: &Member| chosen(m) && !m.untaken && !m.reading_prompt() && !m.pending.is_empty();
        let batch: Vec<(&State, &[u32])> =
            self.members.iter().filter(|m| feeds(m)).map(|m| (&m.state, m.pending.as_slice())).collect();
        if !batch.is_empty() {
            self.model.forward_batch_with(&batch, Want::None, interrupt)?;
        }
        for m in self.members.iter_mut().filter(|m| chosen(m)) {
            let pending = std::mem::take(&mut m.pending);
            if !m.untaken && !m.reading_prompt() {
                m.fed.extend(pending);
            }
            m.untaken = false;
            m.done = true;
        }
        Ok(())
    }

    /// Finishes sequence `id` (as `finish_with`) and takes it out of the batch; its state
    /// then holds exactly its `fed` tokens. Returns (fed, given). It is taken out even when
    /// finishing fails (the error is returned; its state is then not to be used): a caller
    /// that frees the state's slot must not leave a live member on it.
    pub fn remove_with(&mut self, id: SeqId, interrupt: Interrupt) -> Result<(Vec<u32>, Vec<u32>)> {
        self.member(id)?;
        let finished = self.finish_with(Some(&[id]), interrupt);
        let at = self.members.iter().position(|m| m.id == id).expect("checked above");
        let m = self.members.remove(at);
        finished?;
        Ok((m.fed, m.given))
    }

    /// The tokens the caller has taken from sequence `id`, in order.
    pub fn given(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.member(id)?.given)
    }

    /// Tokens fed into sequence `id`'s state so far (its prompt's included).
    pub fn fed(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.member(id)?.fed)
    }

    /// Sequences in the batch (stopped ones until removed).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// One sequence's draw: its sampler and its row of logits, penalised in place.
pub struct Draw<'a> {
    pub sampler: &'a mut Sampler,
    pub logits: &'a mut [f32],
    pub top_logprobs: Option<usize>,
}

/// What a draw gives: the token, and with logprobs asked for its log-probability and the
/// alternatives'.
pub type Drawn = (u32, Option<f32>, Vec<(u32, f32)>);

impl Draw<'_> {
    pub fn run(self) -> Drawn {
        self.sampler.apply_penalties(self.logits);
        let token = self.sampler.sample(self.logits);
        match self.top_logprobs {
            Some(n) => {
                let (logprob, top) = log_probabilities(self.logits, token, n);
                (token, Some(logprob), top)
            }
            None => (token, None, Vec::new()),
        }
    }
}

/// Threads for `draws` draws over `vocab` logits each: up to one per core, each with at
/// least 64K logits to go through (a draw costs ~5 ns a logit, mostly the softmax's exp,
/// so a thread gets a few hundred µs of work for the ~20 µs of starting it). One thread
/// for a small vocabulary or a lone sequence.
pub fn draw_threads(draws: usize, vocab: usize) -> usize {
    crate::parallel::cores().min(draws).min(draws.saturating_mul(vocab) >> 16).max(1)
}

/// The draws' results, in order. Each uses only its own sampler and row, so the results
/// do not depend on `threads`.
pub fn draw_all(draws: Vec<Draw<'_>>, threads: usize) -> Vec<Drawn> {
    crate::parallel::map(draws, threads, Draw::run)
}

/// log softmax of `logits` at `token`, and the `n` most likely tokens with theirs (ties
/// to the lower id). Banned tokens (-inf) have -inf and are never listed.
fn log_probabilities(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max as f64).exp()).sum();
    // Relative to the max first: max + ln(sum) would lose ln(sum) against a huge max.
    let lp = |l: f32| ((l as f64 - max as f64) - sum.ln()) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &l) in logits.iter().enumerate() {
        if n == 0 || l == f32::NEG_INFINITY {
            continue;
        }
        if top.len() == n && l <= top[n - 1].1 {
            continue;
        }
        let at = top.partition_point(|&(_, other)| other >= l);
        top.insert(at, (i as u32, l));
        top.truncate(n);
    }
    (lp(logits[token as usize]), top.into_iter().map(|(t, l)| (t, lp(l))).collect())
}

#[cfg(test)]
mod tests {
    use super::{draw_all, draw_threads, log_probabilities, Draw};
    use crate::sampler::{Sampler, SamplingOptions};

    /// Eight sequences' draws over several steps, each with its own options, seed and
    /// penalty history: the same tokens, log-probabilities and penalised rows whether
    /// drawn one after another or on four threads (the draws share nothing).
    #[test]
    fn draws_side_by_side_equal_draws_in_turn() {
        let vocab = 5000;
        fn draws<'a>(samplers: &'a mut [Sampler], rows: &'a mut [Vec<f32>]) -> Vec<Draw<'a>> {
            samplers
                .iter_mut()
                .zip(rows.iter_mut())
                .enumerate()
                .map(|(i, (sampler, row))| Draw {
                    sampler,
                    logits: row,
                    top_logprobs: (i % 2 == 0).then_some(5),
                })
                .collect()
        }
        let samplers = || -> Vec<Sampler> {
            (0..8u64)
                .map(|i| {
                    let options = SamplingOptions {
                        temperature: [1.0, 0.0, 0.7, 1.3][i as usize % 4],
                        top_p: [0.3, 1.0, 0.9][i as usize % 3],
                        top_k: [0, 40][i as usize % 2],
                        seed: Some(100 + i),
                        ..Default::default()
                    };
                    Sampler::new(options, vocab).unwrap()
                })
                .collect()
        };
        let (mut alone, mut together) = (samplers(), samplers());
        let mut noise = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..6 {
            let rows: Vec<Vec<f32>> = (0..8)
                .map(|_| {
                    (0..vocab)
                        .map(|_| {
                            noise ^= noise << 13;
                            noise ^= noise >> 7;
                            noise ^= noise << 17;
                            (noise >> 40) as f32 / (1u64 << 24) as f32 * 12.0 - 6.0
                        })
                        .collect()
                })
                .collect();
            let (mut rows_alone, mut rows_together) = (rows.clone(), rows);
            let one = draw_all(draws(&mut alone, &mut rows_alone), 1);
            let four = draw_all(draws(&mut together, &mut rows_together), 4);
            assert_eq!(one, four, "step {step}");
            assert_eq!(rows_alone, rows_together, "step {step}: the penalised rows");
            assert!(one.iter().step_by(2).all(|d| d.1.is_some() && d.2.len() == 5));
            for (i, d) in one.iter().enumerate() {
                alone[i].record(d.0, b"x").unwrap();
                together[i].record(d.0, b"x").unwrap();
            }
        }
    }

    #[test]
    fn draw_threads_need_a_large_vocabulary() {
        assert_eq!(draw_threads(16, 256), 1);
        assert_eq!(draw_threads(1, 65536), 1);
        assert!(draw_threads(16, 65536) <= crate::parallel::cores());
        assert_eq!(draw_threads(2, 65536), crate::parallel::cores().min(2));
    }

    #[test]
    fn log_probabilities_are_normalised_and_ordered() {
        let logits = [1.0f32, 3.0, f32::NEG_INFINITY, 3.0, -2.0];
        let (lp, top) = log_probabilities(&logits, 1, 4);
        // Ties by the lower id; the banned token never listed.
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 0, 4]);
        assert_eq!(top[0].1, lp);
        let total: f64 = top.iter().map(|&(_, l)| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "probabilities sum to {total}");
        let z = (1f64.exp() + 2.0 * 3f64.exp() + (-2f64).exp()).ln();
        assert!((lp as f64 - (3.0 - z)).abs() < 1e-6);
        assert_eq!(log_probabilities(&logits, 2, 2), (f32::NEG_INFINITY, vec![(1, lp), (3, lp)]));
        assert!(log_probabilities(&logits, 0, 0).1.is_empty());
        // Near f32::MAX: the normaliser is not lost against the max (both about -ln 2).
        let (lp, top) = log_probabilities(&[3e38, 3e38, f32::NEG_INFINITY], 0, 2);
        assert!((lp - -std::f32::consts::LN_2).abs() < 1e-6, "{lp}");
        assert!(top.iter().all(|&(_, l)| (l - -std::f32::consts::LN_2).abs() < 1e-6), "{top:?}");
    }
}
