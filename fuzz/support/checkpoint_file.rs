//! A flows checkpoint file around a model configuration: the safetensors header of a
//! file without tensors whose metadata holds the format, its version and `config` (any
//! bytes, read as UTF-8 with replacement) as the model configuration. The `metadata`
//! fuzz target and the test that replays its corpus share it.

/// The bytes of the file.
pub fn with_config(config: &[u8]) -> Vec<u8> {
    let config = String::from_utf8_lossy(config);
    let mut header = format!(
        r#"{{"__metadata__":{{"format":"flows","format_version":"1","model_config":{}}}}}"#,
        json_string(&config)
    );
    // The data that follows starts 8-byte aligned, as safetensors writes it.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
