//! Our state files and state-tuning files.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv_gpu::fuzzing::state_file(data));
