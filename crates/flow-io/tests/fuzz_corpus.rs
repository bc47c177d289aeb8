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

#[path = "../../../fuzz/support/checkpoint_file.rs"]
mod checkpoint_file;

/// Loads and builds the checkpoint around the model configuration of a `metadata`
/// corpus file, as the fuzz target does.
fn load_with_config(config: &[u8]) -> Result<flow_io::LoadedModel, flow_io::IoError> {
    let path = Path::new("corpus.safetensors");
    let file = checkpoint_file::with_config(config);
    flow_io::load_bytes(path, &file)
        .and_then(|ck| flow_io::build_checked(path, ck, candle::DType::F32, &candle::Device::Cpu))
}

/// What each seed of `fuzz/corpus/metadata` gives: a model (`None`), or the words of
/// its error (after the file's name, on the first line; candle adds a backtrace when
/// `RUST_BACKTRACE` asks).
const METADATA_SEEDS: [(&str, Option<&str>); 14] = [
    ("valid_reverse.json", None),
    // Accepted and built: the checkpoint lacks the tensors it then needs.
    (
        "valid_affine.json",
        Some("tensor `layers.0.s.0.bias` is missing"),
    ),
    (
        "deep_nesting.json",
        Some("invalid model configuration: recursion limit exceeded"),
    ),
    (
        "dim_negative.json",
        Some("invalid model configuration: invalid value: integer `-1`, expected usize"),
    ),
    (
        "dim_zero.json",
        Some("invalid model configuration: a model needs at least one feature"),
    ),
    (
        "layer_type_number.json",
        Some("invalid model configuration: a layer's `type` must be a string, got 7"),
    ),
    (
        "nested_garbage.json",
        Some("invalid model configuration: a layer's `type` must be a string, got {"),
    ),
    (
        "not_utf8.json",
        Some("invalid model configuration: expected value"),
    ),
    (
        "unknown_kind.json",
        Some("invalid model configuration: layer 0: unknown layer type `nope`"),
    ),
    // Sizes beyond the limits, refused before anything of that size is allocated.
    (
        "dim_1e12.json",
        Some("invalid model configuration: 1000000000000 features: more than the limit of 16777216"),
    ),
    (
        "hidden_1e11.json",
        Some("invalid model configuration: layer 0: 99999999999 hidden units in a layer: more than the limit of 65536"),
    ),
    (
        "mixture_1e11.json",
        Some("invalid model configuration: 99999999999 mixture components: more than the limit of 65536"),
    ),
    // 2305843009213693954 · 8 · 1 wraps to 16 in 64 bits: the product is checked.
    (
        "image_shape_wraps.json",
        Some("invalid model configuration: layer 0: `actnorm` layer: an image of 2305843009213693954 × 8 × 1 values: more than the limit of 16777216"),
    ),
    // A recipe is checked against the layers it describes.
    (
        "recipe_glow_levels_0.json",
        Some("invalid model configuration: the `glow` recipe gives 0 pixel levels"),
    ),
];

/// Replays `fuzz/corpus/metadata` as the `metadata` fuzz target does: each file is the
/// model configuration of a checkpoint without tensors. Nothing panics, the seeds
/// above give their results, and every error names the file on one line.
#[test]
fn metadata_corpus() {
    let mut seen = Vec::new();
    for (name, bytes) in corpus("metadata") {
        seen.push(name.clone());
        let result = load_with_config(&bytes).map(|_| ());
        let want = METADATA_SEEDS.iter().find(|(seed, _)| *seed == name);
        match (result, want) {
            (Ok(()), Some((_, None))) | (Ok(()), None) => {}
            (Err(e), Some((_, Some(words)))) => {
                let e = e.to_string();
                let first = e.lines().next().unwrap_or_default();
                assert!(
                    first.starts_with(&format!("corpus.safetensors: {words}")),
                    "{name}: `{first}` does not start with `{words}`"
                );
            }
            (Err(e), None) => {
                let e = e.to_string();
                assert!(e.starts_with("corpus.safetensors: "), "{name}: {e}");
            }
            (got, Some((_, want))) => panic!("{name}: got {got:?}, expected {want:?}"),
        }
    }
    for seed in METADATA_SEEDS.iter().map(|(seed, _)| *seed) {
        assert!(seen.iter().any(|n| n == seed), "seed {seed} missing");
    }
}
