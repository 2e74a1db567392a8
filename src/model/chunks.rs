//! Packing ragged sequences into chunks: a chunk holds the tokens of one or more
//! sequences back to back and a table of (first token, tokens, slot) rows; nothing is
//! padded.

use crate::sampler::DeviceDraw;

/// One sequence of a call: its state slot (all sequences of a call share one state
/// page), the tokens to feed it and, for `Want::Draw`, its draw (None: it draws nothing).
pub struct SeqInput<'a> {
    pub slot: u32,
    pub tokens: &'a [u32],
    pub draw: Option<&'a DeviceDraw>,
}

/// One row of a chunk's sequence table: `count` tokens of sequence `seq` at chunk rows
/// `first..first + count`, the sequence's tokens `pos..pos + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRow {
    pub first: usize,
    pub count: usize,
    pub seq: usize,
    pub pos: usize,
}

/// Packs sequences of `lens` tokens into chunks of at most `cap` tokens and `max_rows`
/// sequences, in order: a sequence longer than the room left continues in the next
/// chunk, so every chunk but the last is full (of tokens or of sequences), a sequence
/// appears at most once per chunk and its tokens stay in order.
pub fn plan_chunks(lens: &[usize], cap: usize, max_rows: usize) -> Vec<Vec<SeqRow>> {
    let mut chunks = Vec::new();
    let mut rows = Vec::new();
    let mut used = 0;
    for (seq, &len) in lens.iter().enumerate() {
        let mut pos = 0;
        while pos < len {
            if used == cap || rows.len() == max_rows {
                chunks.push(std::mem::take(&mut rows));
                used = 0;
            }
            let count = (len - pos).min(cap - used);
            rows.push(SeqRow { first: used, count, seq, pos });
            used += count;
            pos += count;
        }
    }
    if !rows.is_empty() {
        chunks.push(rows);
    }
    chunks
}

/// Tokens per chunk at first, and at least, while a call can be interrupted: one full
/// 64-token tile of the matrix-matrix kernel.
pub const PACE_MIN: usize = 64;
/// How long an interruptible call's chunk may take. An interrupt waits for the running
/// chunk and, while chunks are quick, the one queued behind it.
const PACE_TARGET_SECONDS: f64 = 1.0;
/// Pieces keep more tokens than this, so that they run the matrix-matrix kernels
/// (`ops::MATVEC_TOKENS`).
const MATVEC_TOKENS: usize = 16;

/// Chunk sizes for interruptible calls, so that Ctrl-C comes within about a second
/// whatever the device: a single-sequence chunk longer than `cap` is cut into pieces,
/// and `cap` follows the measured speed (powers of two from PACE_MIN up to the planned
/// chunk size). Every piece has more than 16 tokens, so it runs the same matrix-matrix
/// kernels as the whole chunk, which compute each token's outputs alike whatever the
/// chunk: the results do not depend on the pace. Chunks slower than half the target
/// are not queued two deep: the GPU idles while the host records the next one (a small
/// part of such a chunk), and an interrupt waits for one chunk only.
pub struct Pace {
    cap: usize,
    max: usize,
    slow: bool,
}

impl Pace {
    /// `adaptive`: the call can be interrupted (else chunks go as planned).
    pub fn new(max: usize, adaptive: bool) -> Pace {
        // Slow until measured: the first chunk is not queued behind.
        Pace { cap: if adaptive { PACE_MIN.min(max) } else { max }, max, slow: true }
    }

    /// Chunks to keep submitted before waiting for the oldest.
    pub fn depth(&self) -> usize {
        if self.slow {
            1
        } else {
            2
        }
    }

    /// The part of `chunk` to run now, and what is left of it.
    pub fn take(&self, chunk: Vec<SeqRow>) -> (Vec<SeqRow>, Option<Vec<SeqRow>>) {
        match chunk.as_slice() {
            [r] if r.count > self.cap
                && r.count - r.count.div_ceil(r.count.div_ceil(self.cap)) > MATVEC_TOKENS =>
            {
                let count = r.count.div_ceil(r.count.div_ceil(self.cap));
                let rest = SeqRow { first: 0, count: r.count - count, seq: r.seq, pos: r.pos + count };
                (vec![SeqRow { count, ..*r }], Some(vec![rest]))
            }
            _ => (chunk, None),
        }
    }

    /// A chunk of `tokens` tokens took `seconds` on the device.
    pub fn observe(&mut self, tokens: usize, seconds: f64) {
        if seconds <= 0.0 {
            return;
        }
        self.slow = seconds > PACE_TARGET_SECONDS / 2.0;
        let fits = tokens as f64 * PACE_TARGET_SECONDS / seconds;
        let mut cap = PACE_MIN;
        while ((2 * cap) as f64) <= fits && 2 * cap <= self.max {
            cap *= 2;
        }
        self.cap = if fits >= self.max as f64 { self.max } else { cap.min(self.max) };
    }
}

#[cfg(test)]
mod tests {
    use super::{plan_chunks, Pace, SeqRow, PACE_MIN};

    #[test]
    fn pace_cuts_single_sequences_into_pieces_of_more_than_16_tokens() {
        let mut pace = Pace::new(256, true);
        let whole = SeqRow { first: 0, count: 256, seq: 0, pos: 512 };
        let (now, rest) = pace.take(vec![whole]);
        assert_eq!(now, [SeqRow { first: 0, count: PACE_MIN, seq: 0, pos: 512 }]);
        assert_eq!(rest.unwrap(), [SeqRow { first: 0, count: 256 - PACE_MIN, seq: 0, pos: 512 + PACE_MIN }]);
        // 129 tokens: pieces of 43 and 86 (then 43 + 43); 65: 33 and 32.
        let (now, rest) = pace.take(vec![SeqRow { first: 0, count: 129, seq: 1, pos: 0 }]);
        assert_eq!((now[0].count, rest.unwrap()[0].count), (43, 86));
        let (now, rest) = pace.take(vec![SeqRow { first: 0, count: 80, seq: 1, pos: 0 }]);
        assert_eq!((now[0].count, rest.unwrap()[0].count), (40, 40));
        let (now, rest) = pace.take(vec![SeqRow { first: 0, count: 65, seq: 1, pos: 0 }]);
        assert_eq!((now[0].count, rest.unwrap()[0].count), (33, 32));
        // Several sequences in a chunk, or a short one: as planned.
        let two = vec![
            SeqRow { first: 0, count: 200, seq: 0, pos: 0 },
            SeqRow { first: 200, count: 56, seq: 1, pos: 0 },
        ];
        assert_eq!(pace.take(two.clone()), (two, None));
        // Fast device: back to whole chunks; slow: the minimum.
        pace.observe(64, 0.01);
        assert_eq!((pace.take(vec![whole]).1, pace.depth()), (None, 2));
        pace.observe(256, 8.0);
        assert_eq!((pace.take(vec![whole]).0[0].count, pace.depth()), (PACE_MIN, 1));
        // Not interruptible: never cut.
        assert_eq!(Pace::new(256, false).take(vec![whole]).1, None);
    }

    #[test]
    fn chunks_are_full_and_sequences_stay_in_order() {
        let lens = [5, 1, 9, 3];
        let chunks = plan_chunks(&lens, 4, 64);
        // 18 tokens in chunks of 4: 4 + 4 + 4 + 4 + 2.
        assert_eq!(
            chunks.iter().map(|c| c.iter().map(|r| r.count).sum::<usize>()).collect::<Vec<_>>(),
            [4, 4, 4, 4, 2]
        );
        assert_eq!(
            chunks[1],
            [
                SeqRow { first: 0, count: 1, seq: 0, pos: 4 },
                SeqRow { first: 1, count: 1, seq: 1, pos: 0 },
                SeqRow { first: 2, count: 2, seq: 2, pos: 0 }
            ]
        );
        // Every sequence's tokens appear once, in order, and rows of a chunk tile it.
        let mut next = vec![0; lens.len()];
        for chunk in &chunks {
            let mut at = 0;
            for r in chunk {
                assert_eq!((r.first, r.pos), (at, next[r.seq]));
                at += r.count;
                next[r.seq] += r.count;
            }
        }
        assert_eq!(next, lens);
    }

    #[test]
    fn a_chunk_holds_at_most_max_rows_sequences() {
        let chunks = plan_chunks(&[1; 10], 256, 4);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        assert!(plan_chunks(&[], 256, 4).is_empty());
    }
}
