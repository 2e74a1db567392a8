//! What the fuzz targets (`fuzz/fuzz_targets/`) run on arbitrary bytes, and what
//! `tests/fuzz_corpus.rs` replays from the corpus and the crashes kept in the repository.
//! Each function exercises one reader of untrusted input all the way (open, list, read
//! every tensor, check against the schema, ...) and asserts what must hold whatever the
//! bytes: no panic, and any value handed back consistent with what was asked. Errors are
//! the expected outcome for most inputs and are discarded.

use std::path::{Path, PathBuf};

use crate::loader::bytes::FileBytes;
use crate::loader::{self, Checkpoint};
use crate::model::Config;
use crate::sampler::{Sampler, SamplingOptions};
use crate::tokenizer::{StreamDecoder, Tokenizer};

const PATH: &str = "<fuzz input>";

fn open(data: &[u8]) -> Option<Box<dyn Checkpoint>> {
    loader::from_bytes(Path::new(PATH), FileBytes::Owned(data.to_vec())).ok()
}

/// In a `checkpoint` input, what separates the file from the config.json beside it (fla's
/// dimensions, which the schema cross-checks or, for what the tensors leave open, takes).
pub const CONFIG_MARKER: &[u8] = b"\0config.json\0";

/// A checkpoint file (`.pth` zip + pickle, safetensors header, our saved-model metadata),
/// optionally followed by CONFIG_MARKER and a config.json: every tensor read, then the
/// schema check (and fla's renaming where the names are its).
pub fn checkpoint(input: &[u8]) {
    let (data, config) = match input.windows(CONFIG_MARKER.len()).position(|w| w == CONFIG_MARKER) {
        Some(at) => (&input[..at], serde_json::from_slice(&input[at + CONFIG_MARKER.len()..]).ok()),
        None => (input, None),
    };
    let Some(ck) = open(data) else { return };
    for name in ck.names() {
        let info = ck.info(&name).expect("a listed tensor has an info");
        if let Ok(bytes) = ck.read(&name) {
            assert_eq!(bytes.len(), info.numel() * info.dtype.size(), "{name}: bytes read vs shape");
            // No tensor holds more than the file's bytes (views repeating elements are refused).
            assert!(
                bytes.len() <= data.len(),
                "{name}: {} bytes from a {}-byte file",
                bytes.len(),
                data.len()
            );
        }
    }
    let ck: Box<dyn Checkpoint> = if loader::fla::is_fla(&ck.names()) {
        match loader::fla::FlaView::new(ck, config.map(|json| (PathBuf::from("config.json"), json))) {
            Ok(view) => Box::new(view),
            Err(_) => return,
        }
    } else {
        ck
    };
    if let Ok(checked) = crate::schema::check(ck.as_ref()) {
        let c = &checked.config;
        assert!(
            c.n_layer <= crate::schema::MAX_LAYERS
                && c.n_embd <= crate::schema::MAX_EMBD
                && c.vocab_size <= crate::schema::MAX_VOCAB
        );
        // Every width sizes buffers: each one in 1..=n_embd, whichever source gave it.
        for d in [c.lora_w, c.lora_a, c.lora_v, c.lora_g] {
            assert!((1..=c.n_embd).contains(&d), "low-rank width {d} with n_embd {}", c.n_embd);
        }
    }
}

/// A small model's dimensions (those of fuzz/make_seeds.py), for state files.
fn small() -> Config {
    Config {
        n_layer: 2,
        n_embd: 8,
        n_head: 2,
        head_size: 4,
        vocab_size: 16,
        ffn_size: 16,
        lora_w: 8,
        lora_a: 8,
        lora_v: 8,
        lora_g: 8,
        deep_embed_rank: 0,
    }
}

/// A state file (ours or a state-tuning file) for a model of `small()`'s dimensions.
pub fn state_file(data: &[u8]) {
    let Some(ck) = open(data) else { return };
    let config = small();
    for transpose in [false, true] {
        if let Ok(host) = crate::model::state_file::read(ck.as_ref(), &config, 0x1234, transpose) {
            assert_eq!(host.att_shift.len(), config.n_layer * config.n_embd);
            assert_eq!(host.wkv.len(), config.n_layer * config.n_embd * config.head_size);
        }
    }
}

/// Token ids (4 bytes each, some past the vocabulary) streamed one at a time: unknown
/// ids are errors that change nothing, and the pieces with `finish` equal the lossy
/// decoding of the known ids' bytes at once (the StreamDecoder's contract). And the bytes
/// themselves encoded, then decoded back unchanged.
pub fn tokenizer(tok: &Tokenizer, data: &[u8]) {
    let limit = tok.vocab_size() as u32 + 8;
    let ids: Vec<u32> =
        data.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) % limit).collect();
    let mut stream = StreamDecoder::new();
    let mut text = String::new();
    let mut known = Vec::new();
    for &id in &ids {
        match stream.push(tok, id) {
            Ok(piece) => {
                text.push_str(&piece);
                known.push(id);
            }
            Err(_) => assert!(tok.token_bytes(id).is_none(), "id {id} refused by the stream but known"),
        }
    }
    text.push_str(&stream.finish());
    let bytes = tok.decode_bytes(&known).expect("known ids decode");
    assert_eq!(text, String::from_utf8_lossy(&bytes), "streamed pieces vs the whole decode");
    let encoded = tok.encode(data);
    assert_eq!(tok.decode_bytes(&encoded).expect("encoded ids decode"), data, "encode then decode");
}

/// Sampler options and logits from bytes: a valid sampler draws an id inside the vocabulary
/// whatever the logits hold (NaN and infinities included).
pub fn sampler(data: &[u8]) {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = data.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let f = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let Some(head) = take(27) else { return };
    let vocab = 1 + (head[0] as usize) * 2;
    let options = SamplingOptions {
        temperature: f(&head[1..5]),
        top_p: f(&head[5..9]),
        top_k: head[9] as usize,
        presence_penalty: f(&head[10..14]),
        frequency_penalty: f(&head[14..18]),
        penalty_decay: f(&head[18..22]),
        banned: (0..head[22] % 8).map(|i| (head[23] as u32 + i as u32 * 37) % 600).collect(),
        logit_bias: (0..head[24] % 4)
            .map(|i| ((head[25] as u32 + i as u32) % 600, f(&head[1..5]) * i as f32))
            .collect(),
        seed: Some(head[26] as u64),
    };
    let Ok(mut sampler) = Sampler::new(options, vocab) else { return };
    let rest = &data[at..];
    let mut logits: Vec<f32> = rest.chunks_exact(4).map(f).take(vocab).collect();
    logits.resize(vocab, 0.0);
    for _ in 0..3 {
        let mut penalised = logits.clone();
        sampler.apply_penalties(&mut penalised);
        let token = sampler.sample(&penalised);
        assert!((token as usize) < vocab, "token {token} outside a vocabulary of {vocab}");
        let p = sampler.probabilities(&penalised);
        assert_eq!(p.len(), vocab);
        sampler.record(token, b"x").expect("a drawn token is in the vocabulary");
    }
}
