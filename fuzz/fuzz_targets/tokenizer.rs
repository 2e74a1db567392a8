//! The World tokenizer's decoder (whole and streamed) and encoder.
#![no_main]
use std::sync::OnceLock;

use rwkv_gpu::tokenizer::Tokenizer;

fn world() -> &'static Tokenizer {
    static WORLD: OnceLock<Tokenizer> = OnceLock::new();
    WORLD.get_or_init(|| {
        let vocab = concat!(env!("CARGO_MANIFEST_DIR"), "/../python/rwkv_gpu/rwkv_vocab_v20230424.txt");
        Tokenizer::from_vocab_file(std::path::Path::new(vocab)).expect("the World vocabulary loads")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv_gpu::fuzzing::tokenizer(world(), data));
