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

/// Images read: `((channels, height, width), rows, values per row)`, the dims written
/// `(0, 0, 0)` for CSV rows, which record none.
type ImagesRead = ((usize, usize, usize), usize, usize);

/// What each seed of `fuzz/corpus/images` gives: its images, or the words of its error.
const IMAGE_SEEDS: [(&str, Result<ImagesRead, &str>); 20] = [
    ("valid_u8.idx3-ubyte", Ok(((1, 2, 3), 2, 6))),
    ("valid_u8.idx3-ubyte.gz", Ok(((1, 2, 3), 2, 6))),
    ("valid_f32.idx4-ubyte", Ok(((2, 2, 2), 1, 8))),
    ("valid_u8.npy", Ok(((1, 2, 2), 3, 4))),
    ("valid_f32.npy", Ok(((1, 2, 3), 2, 6))),
    ("valid_f32.npy.gz", Ok(((1, 2, 3), 2, 6))),
    ("valid_pixels.csv", Ok(((0, 0, 0), 2, 4))),
    (
        "count_1e9.idx3-ubyte",
        Err("IDX dims [1000000000, 28, 28] of 1-byte elements need 784000000000 data bytes, the file holds 16"),
    ),
    (
        "dims_overflow.idx4-ubyte",
        Err("need more than 2^64 data bytes, the file holds 8"),
    ),
    (
        "header_cut.idx3-ubyte",
        Err("truncated IDX file: 9 bytes, the header needs 16"),
    ),
    ("element_type.idx3-ubyte", Err("unknown IDX element type 0x0a")),
    ("rank_1.idx1-ubyte", Err("IDX file of 1 dimensions")),
    ("count_1e9.npy", Err("more elements")),
    ("shape_overflow.npy", Err("more elements")),
    ("nan.npy", Err("row 1, column 2 is NaN: values must be finite")),
    ("rank_1.npy", Err("got 1 dimensions")),
    ("empty.npy", Err("no images: the array is empty")),
    ("body_cut.npy", Err("needs 32 data bytes, the file holds 12")),
    ("gzip_cut.npy.gz", Err("corrupt gzip data")),
    ("ragged.csv", Err("line 2")),
];

/// Replays `fuzz/corpus/images` through the bytes entry point of the image readers,
/// each file under its own name (the extension picks the reader): nothing panics, the
/// seeds above load with their shapes or fail with their errors, each naming the
/// file, and other files (a fuzzer's finds) are images or errors naming the file.
#[test]
fn images_corpus() {
    use flow_train::data::images_from_bytes;

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/images");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("corpus folder") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let bytes = std::fs::read(&path).expect("read");
        let loaded = images_from_bytes(bytes, std::path::Path::new(&name));
        let want = IMAGE_SEEDS.iter().find(|(seed, _)| *seed == name);
        match (loaded, want) {
            (Ok(images), Some((_, Ok(((c, h, w), rows, dim))))) => {
                let dims = images.dims.map(|d| (d.channels, d.height, d.width));
                let want_dims = (*c > 0).then_some((*c, *h, *w));
                assert_eq!(dims, want_dims, "{name}: image dims");
                assert_eq!(
                    (images.data.len(), images.data.dim),
                    (*rows, *dim),
                    "{name}: rows"
                );
                assert!(images.data.values.iter().all(|v| v.is_finite()), "{name}");
            }
            (Err(e), Some((_, Err(words)))) => {
                let e = e.to_string();
                assert!(
                    e.starts_with(&name),
                    "{name}: the error names another file: {e}"
                );
                assert!(e.contains(words), "{name}: `{e}` lacks `{words}`");
                assert!(!e.contains('\n'), "{name}: one line: {e}");
            }
            (Err(e), None) => {
                let e = e.to_string();
                assert!(
                    e.starts_with(&name),
                    "{name}: the error names another file: {e}"
                );
            }
            (Ok(_), None) => {}
            (got, Some((_, want))) => panic!("{name}: got {got:?}, expected {want:?}"),
        }
        seen.push(name);
    }
    for (seed, _) in IMAGE_SEEDS {
        assert!(seen.iter().any(|n| n == seed), "seed {seed} missing");
    }
}
