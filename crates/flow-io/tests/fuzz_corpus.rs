//! Replays the committed fuzz corpus (`fuzz/corpus`) through the code the fuzz targets
//! exercise, so CI covers it without a fuzzer: nothing panics, good inputs load and
//! damaged ones are errors.

use std::path::{Path, PathBuf};

use flow_io::{import_bytes, ImportOptions, Source};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("corpus folder")
        .map(|e| {
            let p = e.expect("entry").path();
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
}

#[test]
fn checkpoint_corpus() {
    let path = Path::new("corpus.safetensors");
    for (name, bytes) in corpus("checkpoint") {
        let result = flow_io::load_bytes(path, &bytes).and_then(|ck| {
            flow_io::build_checked(path, ck, candle::DType::F32, &candle::Device::Cpu)
        });
        assert_eq!(
            result.is_ok(),
            name == "good.safetensors",
            "{name}: {:?}",
            result.err()
        );
    }
}

#[test]
fn import_corpus() {
    let path = Path::new("corpus.safetensors");
    for (name, bytes) in corpus("import") {
        for source in Source::ALL {
            let ok = import_bytes(source, path, &bytes, &ImportOptions::default()).is_ok();
            let matching = !name.ends_with("_truncated") && name.starts_with(source.name());
            assert_eq!(ok, matching, "{name} as {}", source.name());
        }
    }
}
