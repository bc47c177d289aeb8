//! Rows streamed from a file: each epoch visits every row once, in an order the seed
//! fixes, and a pass over the file gives the numbers the rows held in memory give.

use std::path::{Path, PathBuf};

use flow_train::{
    data::{load_npy, load_pixel_images, Moments, StreamSource},
    fingerprint,
};

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-stream-lib-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A `.npy` file of `dim` little-endian f32 values a row.
fn write_npy(path: &Path, dim: usize, values: &[f32]) {
    let rows = values.len() / dim;
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).expect("write npy");
}

/// Row `i` of 103 holds `(i, i²/100)`.
fn rows(path: &Path) {
    let values: Vec<f32> = (0..103)
        .flat_map(|i| [i as f32, (i * i) as f32 / 100.0])
        .collect();
    write_npy(path, 2, &values);
}

/// The rows of epoch `epoch` in the order they are visited: chunk by chunk in the
/// epoch's order of chunks, each chunk's rows in the epoch's order of them.
fn visited(source: &StreamSource, seed: u64, epoch: usize) -> Vec<usize> {
    let mut reader = source.reader().expect("reader");
    let mut order = Vec::new();
    for chunk in source.chunk_order(seed, epoch) {
        let data = reader.read(chunk).expect("chunk");
        for r in source.row_order(seed, epoch, chunk) {
            order.push(data.values[r * 2] as usize);
        }
    }
    order
}

#[test]
fn every_row_is_visited_once_an_epoch_in_an_order_the_seed_fixes() {
    let d = dir("order");
    let file = d.join("rows.npy");
    rows(&file);
    // 103 rows in chunks of 10: the last chunk holds 3.
    let source = StreamSource::open(&file, 10, false, 0).expect("open");
    assert_eq!(
        (source.len(), source.chunks(), source.chunk_len(10)),
        (103, 11, 3)
    );
    let first = visited(&source, 1, 0);
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..103).collect::<Vec<_>>());
    assert_ne!(first, sorted, "the rows were not shuffled");
    // Chunks stay together: the first ten rows visited come from one chunk.
    assert!(first[..10].iter().all(|r| r / 10 == first[0] / 10));
    assert_eq!(first, visited(&source, 1, 0), "not reproducible");
    assert_ne!(first, visited(&source, 2, 0), "the seed does not change it");
    assert_ne!(
        first,
        visited(&source, 1, 1),
        "the epoch does not change it"
    );
}

#[test]
fn a_pass_over_the_file_gives_the_numbers_of_the_rows_in_memory() {
    let d = dir("scan");
    let file = d.join("rows.npy");
    rows(&file);
    let held = load_npy(&file).expect("load");
    let source = StreamSource::open(&file, 7, false, 0).expect("open");
    let scan = source.scan(true, None).expect("scan");
    assert_eq!(scan.fingerprint, fingerprint(&held));
    let mut m = Moments::new(held.len(), held.dim);
    m.add_to_mean(&held.values);
    m.add_to_variance(&held.values);
    assert_eq!(scan.moments, Some(m.finish()));
    // The context split off a chunk's rows as the whole file's is; the last chunk
    // holds rows 99 to 103.
    let conditional = StreamSource::open(&file, 7, false, 1).expect("open");
    let held = held.split_context(1, "rows").expect("split");
    assert_eq!(
        conditional.scan(false, None).expect("scan").fingerprint,
        fingerprint(&held)
    );
    assert_eq!(
        conditional
            .reader()
            .expect("reader")
            .read(14)
            .expect("chunk")
            .context,
        [96.04, 98.01, 100.0, 102.01, 104.04]
    );
}

#[test]
fn idx_images_stream_as_the_file_loads() {
    let d = dir("idx");
    let file = d.join("images-idx3-ubyte");
    // 5 images of 2×3 bytes, big-endian sizes after the magic 00 00 08 03.
    let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0, 0, 3];
    bytes.extend((0..30u8).map(|b| b * 7));
    std::fs::write(&file, &bytes).expect("write");
    let held = load_pixel_images(&file).expect("load");
    let source = StreamSource::open(&file, 2, true, 0).expect("open");
    assert_eq!(source.dims(), held.dims);
    let mut reader = source.reader().expect("reader");
    let streamed: Vec<u8> = (0..source.chunks())
        .flat_map(|c| reader.read(c).expect("chunk").pixels)
        .collect();
    assert_eq!(streamed, held.data.pixels);
    // Pixel levels are checked in the pass: 203 is not below 200.
    let e = source
        .scan(false, Some(200))
        .expect_err("refused")
        .to_string();
    assert!(
        e.ends_with("row 5, column 6: 203 is not a pixel value (whole numbers 0 to 199)"),
        "{e}"
    );
}
