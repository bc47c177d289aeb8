//! Any bytes given to every importer: an error or a model, never a panic.
#![no_main]

use std::path::Path;

use flow_io::{import_bytes, ImportOptions, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for source in Source::ALL {
        let _ = import_bytes(source, Path::new("fuzz.safetensors"), data, &ImportOptions::default());
    }
});
