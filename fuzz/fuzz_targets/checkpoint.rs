//! .pth (zip + pickle), safetensors headers, saved-model metadata, the schema check.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv_gpu::fuzzing::checkpoint(data));
