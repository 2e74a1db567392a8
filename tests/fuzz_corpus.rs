//! Replays every fuzz input kept in the repository through its target's function
//! (`rwkv_gpu::fuzzing`): the corpus (fuzz/corpus/<target>/) and the crashes found so far
//! (fuzz/artifacts/<target>/). Fast, no nightly toolchain: a crash once found stays fixed.

use std::path::{Path, PathBuf};

use rwkv_gpu::fuzzing;
use rwkv_gpu::tokenizer::Tokenizer;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "artifacts"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) {
            files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    files.sort();
    files
}

fn replay(target: &str, run: impl Fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}: run fuzz/make_seeds.py");
    for file in files {
        let data = std::fs::read(&file).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&data)));
        assert!(outcome.is_ok(), "{target}: {} panics", file.display());
    }
}

#[test]
fn checkpoint_inputs() {
    replay("checkpoint", fuzzing::checkpoint);
}

#[test]
fn state_file_inputs() {
    replay("state_file", fuzzing::state_file);
}

#[test]
fn sampler_inputs() {
    replay("sampler", fuzzing::sampler);
}

#[test]
fn tokenizer_inputs() {
    let vocab = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/rwkv_gpu/rwkv_vocab_v20230424.txt");
    let world = Tokenizer::from_vocab_file(&vocab).unwrap();
    replay("tokenizer", |data| fuzzing::tokenizer(&world, data));
}
