//! The head: the final LayerNorm of the wanted rows and what the call asked for of them
//! (normalised rows, logits, or each row's argmax), copied into the read-back buffer.

use super::forward::Want;
use super::ops::{self, Act, Argmax, LayerNorm, Product, Sample};
use super::scratch::Scratch;
use super::weights::consts;
use super::Model;
use crate::error::Result;
use crate::gpu::recorder::Copy;
use crate::gpu::Recorder;

/// `len` values read back from `src` (f32 index in the staging buffer) go to column
/// `col` of the output row of wanted row `row`.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub src: usize,
    pub row: usize,
    pub col: usize,
    pub len: usize,
}

/// Grows the buffers that `record` needs for `rows` wanted rows (before recording, so
/// that a recording never sees a buffer replaced under it).
pub fn prepare(model: &Model, s: &mut Scratch, want: Want, rows: usize) -> Result<()> {
    let floats = match want {
        Want::None => return Ok(()),
        Want::HiddenLast | Want::HiddenAll => rows * model.config.n_embd,
        Want::Argmax | Want::Draw => rows * 2,
        Want::Last | Want::All => rows * model.config.vocab_size,
    };
    if matches!(want, Want::Argmax | Want::Draw | Want::Last | Want::All) {
        s.ensure_logits(model, rows)?;
    }
    if want == Want::Draw && model.weights.head.chunks.len() > 1 {
        s.ensure_draw_logits(model, rows)?;
    }
    s.ensure_staging(model, (floats * 4) as u64)
}

/// Records the head for the `wanted` chunk rows; returns where each read-back value goes
/// (rows of the result are indices into `wanted`).
pub fn record(
    model: &Model,
    rec: &mut Recorder,
    s: &Scratch,
    want: Want,
    wanted: &[usize],
) -> Result<Vec<Placement>> {
    match want {
        Want::None => Ok(Vec::new()),
        Want::HiddenLast | Want::HiddenAll => record_hidden(model, rec, s, wanted),
        Want::Argmax => record_argmax(model, rec, s, wanted),
        Want::Draw => record_draw(model, rec, s, wanted),
        Want::Last | Want::All => record_logits(model, rec, s, wanted),
    }
}

/// The final layer norm of the `wanted` chunk rows into consecutive rows of `norm` from
/// `out_row0`: one dispatch per run of consecutive rows.
fn final_norm(
    model: &Model,
    rec: &mut Recorder,
    s: &Scratch,
    wanted: &[usize],
    out_row0: usize,
) -> Result<()> {
    let mut i = 0;
    while i < wanted.len() {
        let mut n = 1;
        while i + n < wanted.len() && wanted[i + n] == wanted[i] + n {
            n += 1;
        }
        ops::layer_norm(
            model,
            rec,
            LayerNorm {
                x: &s.x,
                in_row0: wanted[i],
                rows: n,
                consts: &model.weights.consts,
                weight: consts::LNOUT_W,
                bias: consts::LNOUT_B,
                y: &s.norm,
                out_row0: out_row0 + i,
            },
        )?;
        i += n;
    }
    Ok(())
}

/// The wanted rows' ln_out outputs, read back as they are.
fn record_hidden(model: &Model, rec: &mut Recorder, s: &Scratch, wanted: &[usize]) -> Result<Vec<Placement>> {
    let c = model.config.n_embd;
    final_norm(model, rec, s, wanted, 0)?;
    let bytes = (wanted.len() * c * 4) as u64;
    rec.copy(Copy {
        src: s.norm.clone(),
        src_offset: 0,
        dst: s.staging().clone(),
        dst_offset: 0,
        size: bytes,
    });
    Ok((0..wanted.len()).map(|i| Placement { src: i * c, row: i, col: 0, len: c }).collect())
}

/// The head's logits of `n` normalised rows (from `norm` row `row0`) for head chunk `i`.
fn head_chunk(model: &Model, rec: &mut Recorder, s: &Scratch, i: usize, row0: usize, n: usize) -> Result<()> {
    let head = &model.weights.head;
    let chunk = &head.chunks[i];
    // One chunk as its own matrix: its rows land at 0 of its logits buffer.
    let product = Product {
        w: head,
        x_off: row0 * model.config.n_embd,
        y_off: 0,
        y_stride: chunk.rows,
        act: Act::None,
        add: false,
    };
    ops::chunk_product(model, rec, &product, i, &s.norm, &s.logits[i], n)
}

/// Each wanted row's largest logit, found on the device: the head in groups of rows that
/// fit the logits buffers, each head row chunk folded into a running best per row.
fn record_argmax(model: &Model, rec: &mut Recorder, s: &Scratch, wanted: &[usize]) -> Result<Vec<Placement>> {
    let head = &model.weights.head;
    final_norm(model, rec, s, wanted, 0)?;
    let mut done = 0;
    while done < wanted.len() {
        let n = (wanted.len() - done).min(s.logits_tokens);
        for (i, chunk) in head.chunks.iter().enumerate() {
            head_chunk(model, rec, s, i, done, n)?;
            ops::argmax(
                model,
                rec,
                Argmax {
                    logits: &s.logits[i],
                    rows: chunk.rows,
                    row0: chunk.row0,
                    first: i == 0,
                    best: &s.best,
                    out0: done,
                    tokens: n,
                },
            )?;
        }
        done += n;
    }
    Ok(read_best(rec, s, wanted.len()))
}

/// Reads back `rows` rows of `best`, (token id, -) each: the output keeps the id, as f32
/// bits.
fn read_best(rec: &mut Recorder, s: &Scratch, rows: usize) -> Vec<Placement> {
    rec.copy(Copy {
        src: s.best.clone(),
        src_offset: 0,
        dst: s.staging().clone(),
        dst_offset: 0,
        size: (rows * 8) as u64,
    });
    (0..rows).map(|j| Placement { src: 2 * j, row: j, col: 0, len: 1 }).collect()
}

/// A token drawn for each wanted row by the device's sampler, with draws table row j for
/// wanted row j (uploaded with the chunk): the head in groups of rows; a head of several
/// row chunks has each group's chunks gathered into whole rows first.
fn record_draw(model: &Model, rec: &mut Recorder, s: &Scratch, wanted: &[usize]) -> Result<Vec<Placement>> {
    let head = &model.weights.head;
    let vocab = model.config.vocab_size;
    let group = match (&s.draw_logits, head.chunks.len()) {
        (_, 1) => s.logits_tokens,
        (Some(_), _) => s.logits_tokens.min(s.draw_rows),
        (None, _) => unreachable!("head::prepare makes the gathered rows"),
    };
    let mut done = 0;
    while done < wanted.len() {
        let n = (wanted.len() - done).min(group);
        final_norm(model, rec, s, &wanted[done..done + n], 0)?;
        for i in 0..head.chunks.len() {
            head_chunk(model, rec, s, i, 0, n)?;
        }
        let rows = match &s.draw_logits {
            Some(gathered) if head.chunks.len() > 1 => {
                for (i, chunk) in head.chunks.iter().enumerate() {
                    for j in 0..n {
                        rec.copy(Copy {
                            src: s.logits[i].clone(),
                            src_offset: (j * chunk.rows * 4) as u64,
                            dst: gathered.clone(),
                            dst_offset: ((j * vocab + chunk.row0) * 4) as u64,
                            size: (chunk.rows * 4) as u64,
                        });
                    }
                }
                gathered
            }
            _ => &s.logits[0],
        };
        ops::sample(
            model,
            rec,
            Sample {
                logits: rows,
                draws: &s.draws,
                entries: &s.draw_entries,
                best: &s.best,
                row0: done,
                rows: n,
            },
        )?;
        done += n;
    }
    Ok(read_best(rec, s, wanted.len()))
}

/// The wanted rows' logits, in groups of rows that fit the logits buffers; each head row
/// chunk writes its own (n, rows) block, copied to the staging buffer in turn.
fn record_logits(model: &Model, rec: &mut Recorder, s: &Scratch, wanted: &[usize]) -> Result<Vec<Placement>> {
    let head = &model.weights.head;
    let mut places = Vec::new();
    let mut at = 0;
    let mut done = 0;
    while done < wanted.len() {
        let n = (wanted.len() - done).min(s.logits_tokens);
        let group_rows = &wanted[done..done + n];
        final_norm(model, rec, s, group_rows, 0)?;
        for (i, chunk) in head.chunks.iter().enumerate() {
            head_chunk(model, rec, s, i, 0, n)?;
            let bytes = (n * chunk.rows * 4) as u64;
            rec.copy(Copy {
                src: s.logits[i].clone(),
                src_offset: 0,
                dst: s.staging().clone(),
                dst_offset: (at * 4) as u64,
                size: bytes,
            });
            for j in done..done + n {
                places.push(Placement { src: at, row: j, col: chunk.row0, len: chunk.rows });
                at += chunk.rows;
            }
        }
        done += n;
    }
    Ok(places)
}
