//! Replays the committed CSV fuzz corpus (`fuzz/corpus/csv`): no panic, well-formed
//! files parse, malformed ones are errors.

use std::path::PathBuf;

#[test]
fn csv_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/csv");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus folder") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let bytes = std::fs::read(&path).expect("read");
        let parsed = flow_train::data::parse_csv(bytes.as_slice(), &name);
        let well_formed = ["plain", "header", "crlf", "spaces"].contains(&name.as_str());
        assert_eq!(parsed.is_ok(), well_formed, "{name}: {parsed:?}");
        if let Ok(d) = parsed {
            assert_eq!(
                (d.dim, d.len()),
                (2, if name == "header" { 1 } else { 2 }),
                "{name}"
            );
        }
        seen += 1;
    }
    assert!(seen >= 5);
}
