//! Sampler options and logits.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv_gpu::fuzzing::sampler(data));
