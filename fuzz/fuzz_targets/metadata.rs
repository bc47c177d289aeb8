//! Any bytes as the model configuration in a checkpoint's metadata: an error or a
//! model, never a panic or an allocation the file does not justify.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

#[path = "../support/checkpoint_file.rs"]
mod checkpoint_file;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    let file = checkpoint_file::with_config(data);
    if let Ok(ck) = flow_io::load_bytes(path, &file) {
        let _ = flow_io::build_checked(path, ck, candle::DType::F32, &candle::Device::Cpu);
    }
});
