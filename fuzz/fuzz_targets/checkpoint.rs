//! Any bytes given as a checkpoint: an error or a model, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    if let Ok(ck) = flow_io::load_bytes(path, data) {
        let _ = flow_io::build_checked(path, ck, candle::DType::F32, &candle::Device::Cpu);
    }
});
