//! Any bytes as a CSV data file: rows or an error naming the line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flow_train::data::parse_csv(data, "fuzz.csv");
});
