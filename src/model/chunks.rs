//! Packing ragged sequences into chunks: a chunk holds the tokens of one or more
//! sequences back to back and a table of (first token, tokens, slot) rows; nothing is
//! padded.

/// One sequence of a call: its state slot (all sequences of a call share one state
/// page) and the tokens to feed it.
pub struct SeqInput<'a> {
    pub slot: u32,
    pub tokens: &'a [u32],
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

#[cfg(test)]
mod tests {
    use super::{plan_chunks, SeqRow};

    #[test]
    fn chunks_are_full_and_sequences_stay_in_order() {
        let lens = [5, 1, 9, 3];
        let chunks = plan_chunks(&lens, 4, 64);
        // 18 tokens in chunks of 4: 4 + 4 + 4 + 4 + 2.
        assert_eq!(chunks.iter().map(|c| c.iter().map(|r| r.count).sum::<usize>()).collect::<Vec<_>>(), [4, 4, 4, 4, 2]);
        assert_eq!(chunks[1], [SeqRow { first: 0, count: 1, seq: 0, pos: 4 }, SeqRow { first: 1, count: 1, seq: 1, pos: 0 }, SeqRow { first: 2, count: 2, seq: 2, pos: 0 }]);
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
