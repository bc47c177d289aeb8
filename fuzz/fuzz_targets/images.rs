//! Any bytes as an image file (IDX, .npy or pixel CSV, gzipped or not), under each
//! kind of name: images or an error naming the file, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for name in ["fuzz.idx3-ubyte", "fuzz.npy", "fuzz.csv", "fuzz.npy.gz"] {
        let _ = flow_train::data::images_from_bytes(data.to_vec(), Path::new(name));
    }
});
