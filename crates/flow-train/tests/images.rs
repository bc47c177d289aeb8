//! Image loading: .npy and IDX files (plain and gzipped) read back exactly, the
//! shipped digits, pixel checks, and hostile files that must be errors naming the
//! file, never panics or huge allocations.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use flow_train::data::{
    check_pixels, digits, digits_labels, load_images, load_npy, load_path, Dataset, ImageDims,
    Images, DIGITS_LEVELS,
};
use npyz::WriterBuilder;

/// A fresh folder for one test's files.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flow-images-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// A .npy file written by npyz's writer (an independent writer of the format).
fn npy<T: npyz::AutoSerialize + Copy>(shape: &[u64], data: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut out)
        .begin_nd()
        .expect("npy writer");
    w.extend(data.iter().copied()).expect("npy data");
    w.finish().expect("npy finish");
    out
}

/// A .npy file with a hand-made header text (version 1), for hostile headers.
fn npy_raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// An IDX file: magic, big-endian sizes, then the already big-endian elements.
fn idx(kind: u8, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, kind, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(body);
    out
}

fn dims(channels: usize, height: usize, width: usize) -> Option<ImageDims> {
    Some(ImageDims {
        channels,
        height,
        width,
    })
}

fn load(path: &Path) -> Images {
    load_images(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn npy_images_read_back_exactly() {
    let dir = temp_dir("npy");
    let u8s: Vec<u8> = (0..24).map(|i| (i * 11) as u8).collect();
    let want: Vec<f32> = u8s.iter().map(|&v| f32::from(v)).collect();

    // (N, H, W) uint8: one channel.
    let p = write(&dir, "a.npy", &npy(&[3, 2, 4], &u8s));
    let got = load(&p);
    assert_eq!(got.dims, dims(1, 2, 4));
    assert_eq!((got.data.dim, got.data.len()), (8, 3));
    assert_eq!(got.data.values, want);
    assert_eq!(got.dims.map(|d| d.len()), Some(8));

    // (N, C, H, W) uint8.
    let p = write(&dir, "b.npy", &npy(&[2, 3, 2, 2], &u8s));
    let got = load(&p);
    assert_eq!(got.dims, dims(3, 2, 2));
    assert_eq!((got.data.dim, got.data.len()), (12, 2));
    assert_eq!(got.data.values, want);

    // float32 (N, C, H, W), float64 (N, H, W).
    let f32s: Vec<f32> = (0..24).map(|i| i as f32 * 0.125 - 1.0).collect();
    let p = write(&dir, "c.npy", &npy(&[1, 2, 3, 4], &f32s));
    let got = load(&p);
    assert_eq!(got.dims, dims(2, 3, 4));
    assert_eq!(got.data.values, f32s);
    let f64s: Vec<f64> = f32s.iter().map(|&v| f64::from(v)).collect();
    let p = write(&dir, "d.npy", &npy(&[4, 3, 2], &f64s));
    let got = load(&p);
    assert_eq!(got.dims, dims(1, 3, 2));
    assert_eq!((got.data.dim, got.data.len()), (6, 4));
    assert_eq!(got.data.values, f32s);

    // 2-D rows: no dims recorded.
    let p = write(&dir, "e.npy", &npy(&[6, 4], &f32s));
    let got = load(&p);
    assert_eq!(got.dims, None);
    assert_eq!((got.data.dim, got.data.len()), (4, 6));
    assert_eq!(got.data.values, f32s);

    // The other element types, and big-endian data.
    let header = |descr: &str| {
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (1, 2, 2), }}\n")
    };
    let ints = [-7i64, 0, 3, 120];
    let want_ints: Vec<f32> = ints.iter().map(|&v| v as f32).collect();
    let cases: [(&str, Vec<u8>); 6] = [
        ("|i1", ints.iter().map(|&v| v as i8 as u8).collect()),
        (
            "<i2",
            ints.iter()
                .flat_map(|&v| (v as i16).to_le_bytes())
                .collect(),
        ),
        (
            "<i4",
            ints.iter()
                .flat_map(|&v| (v as i32).to_le_bytes())
                .collect(),
        ),
        ("<i8", ints.iter().flat_map(|&v| v.to_le_bytes()).collect()),
        (
            ">i4",
            ints.iter()
                .flat_map(|&v| (v as i32).to_be_bytes())
                .collect(),
        ),
        (
            ">f4",
            want_ints.iter().flat_map(|&v| v.to_be_bytes()).collect(),
        ),
    ];
    for (descr, body) in cases {
        let got = load(&write(&dir, "t.npy", &npy_raw(&header(descr), &body)));
        assert_eq!(got.dims, dims(1, 2, 2), "{descr}");
        assert_eq!(got.data.values, want_ints, "{descr}");
    }

    // Gzipped, with and without a .gz name.
    let bytes = gzip(&npy(&[3, 2, 4], &u8s));
    for name in ["f.npy.gz", "g.npy"] {
        let got = load(&write(&dir, name, &bytes));
        assert_eq!(got.dims, dims(1, 2, 4), "{name}");
        assert_eq!(got.data.values, want, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn idx_images_read_back_exactly() {
    let dir = temp_dir("idx");
    // MNIST layout: unsigned bytes, N×H×W.
    let pixels: Vec<u8> = (0..=255).cycle().take(2 * 3 * 5).collect();
    let want: Vec<f32> = pixels.iter().map(|&v| f32::from(v)).collect();
    let bytes = idx(0x08, &[2, 3, 5], &pixels);
    let gz = gzip(&bytes);
    for (name, data) in [
        ("train-images-idx3-ubyte", &bytes),
        ("t10k-images.idx3-ubyte", &bytes),
        ("plain.bin", &bytes),
        ("train-images-idx3-ubyte.gz", &gz),
        ("gzipped-without-suffix-idx3-ubyte", &gz),
    ] {
        let got = load(&write(&dir, name, data));
        assert_eq!(got.dims, dims(1, 3, 5), "{name}");
        assert_eq!((got.data.dim, got.data.len()), (15, 2), "{name}");
        assert_eq!(got.data.values, want, "{name}");
    }

    // Signed 16-bit, 4 dims N×C×H×W.
    let i16s: Vec<i16> = (0..24).map(|i| (i - 12) * 1000).collect();
    let body: Vec<u8> = i16s.iter().flat_map(|v| v.to_be_bytes()).collect();
    let got = load(&write(&dir, "s.idx", &idx(0x0b, &[2, 3, 2, 2], &body)));
    assert_eq!(got.dims, dims(3, 2, 2));
    let want16: Vec<f32> = i16s.iter().map(|&v| f32::from(v)).collect();
    assert_eq!(got.data.values, want16);

    // The other element types: i8, i32, f32, f64.
    let vals: [f32; 4] = [-3.0, 0.0, 1.5, 100.0];
    let ints = [-3i32, 0, 1, 100];
    let cases: [(u8, Vec<u8>, Vec<f32>); 4] = [
        (
            0x09,
            ints.iter().map(|&v| v as i8 as u8).collect(),
            ints.iter().map(|&v| v as f32).collect(),
        ),
        (
            0x0c,
            ints.iter().flat_map(|v| v.to_be_bytes()).collect(),
            ints.iter().map(|&v| v as f32).collect(),
        ),
        (
            0x0d,
            vals.iter().flat_map(|v| v.to_be_bytes()).collect(),
            vals.to_vec(),
        ),
        (
            0x0e,
            vals.iter()
                .flat_map(|&v| f64::from(v).to_be_bytes())
                .collect(),
            vals.to_vec(),
        ),
    ];
    for (kind, body, want) in cases {
        let got = load(&write(&dir, "t.idx", &idx(kind, &[1, 2, 2], &body)));
        assert_eq!(got.dims, dims(1, 2, 2), "type {kind:#x}");
        assert_eq!(got.data.values, want, "type {kind:#x}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn csv_images_have_no_dims() {
    let dir = temp_dir("csv");
    let text = "1,2,3\n4,5,6\n";
    for (name, bytes) in [
        ("r.csv", text.as_bytes().to_vec()),
        ("r.csv.gz", gzip(text.as_bytes())),
    ] {
        let got = load(&write(&dir, name, &bytes));
        assert_eq!(got.dims, None);
        assert_eq!(got.data, Dataset::new(3, vec![1., 2., 3., 4., 5., 6.]));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The shipped CSV's lines, parsed here independently of the library.
fn shipped_digits() -> Vec<Vec<f64>> {
    let gz = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz"))
        .expect("shipped digits");
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_string(&mut text)
        .expect("gunzip");
    text.lines()
        .map(|l| {
            l.split(',')
                .map(|c| c.trim().parse().expect("number"))
                .collect()
        })
        .collect()
}

#[test]
fn digits_match_the_shipped_file() {
    let d = digits();
    assert_eq!(d.dims, dims(1, 8, 8));
    assert_eq!((d.data.dim, d.data.len()), (64, 1797));
    assert_eq!(d.data.context_dim, 0);
    assert!(d.data.values.iter().all(|&v| (0.0..=16.0).contains(&v)));
    check_pixels(&d.data, DIGITS_LEVELS, "digits").expect("pixels in 0..=16");
    // Some pixel is 16, outside 16 levels.
    let err = check_pixels(&d.data, DIGITS_LEVELS - 1, "digits").expect_err("a 16");
    assert!(
        err.to_string()
            .contains(": 16 is not a pixel value (whole numbers 0 to 15)"),
        "{err}"
    );

    let first: [f32; 64] = [
        0., 0., 5., 13., 9., 1., 0., 0., 0., 0., 13., 15., 10., 15., 5., 0., 0., 3., 15., 2., 0.,
        11., 8., 0., 0., 4., 12., 0., 0., 8., 8., 0., 0., 5., 8., 0., 0., 9., 8., 0., 0., 4., 11.,
        0., 1., 12., 7., 0., 0., 2., 14., 5., 10., 12., 0., 0., 0., 0., 6., 13., 10., 0., 0., 0.,
    ];
    assert_eq!(&d.data.values[..64], &first);

    let lines = shipped_digits();
    assert_eq!(lines.len(), 1797);
    assert!(lines.iter().all(|l| l.len() == 65));
    let csv_mean = lines.iter().flat_map(|l| &l[..64]).sum::<f64>() / (1797.0 * 64.0);
    let mean = d.data.values.iter().map(|&v| f64::from(v)).sum::<f64>() / (1797.0 * 64.0);
    assert!((mean - csv_mean).abs() < 1e-12, "{mean} vs {csv_mean}");
    // scikit-learn's digits average about 4.88 per pixel.
    assert!((4.8..4.95).contains(&mean), "{mean}");
    let last: Vec<f32> = lines[1796][..64].iter().map(|&v| v as f32).collect();
    assert_eq!(&d.data.values[1796 * 64..], last.as_slice());

    let labels = digits_labels();
    assert_eq!(labels.len(), 1797);
    assert!(labels.iter().all(|&l| l <= 9));
    assert_eq!(&labels[..3], &[0, 1, 2]);
    let from_csv: Vec<u8> = lines.iter().map(|l| l[64] as u8).collect();
    assert_eq!(labels, from_csv);
}

#[test]
fn check_pixels_names_row_column_and_value() {
    let ok = Dataset::new(3, vec![0., 1., 16., 2., 3., 4.]);
    check_pixels(&ok, 17, "ok").expect("valid pixels");
    for (bad, shown) in [(17.0, "17"), (-1.0, "-1"), (2.5, "2.5"), (f32::NAN, "NaN")] {
        let d = Dataset::new(3, vec![0., 1., 16., 2., 3., bad]);
        let e = check_pixels(&d, 17, "pics")
            .expect_err("bad pixel")
            .to_string();
        assert!(e.starts_with("pics: "), "{e}");
        assert!(e.contains("row 2, column 3"), "{e}");
        assert!(e.contains(shown), "{e}");
    }
    let e = check_pixels(&Dataset::new(2, vec![f32::INFINITY, 0.]), 256, "x")
        .expect_err("infinite")
        .to_string();
    assert!(e.contains("row 1, column 1"), "{e}");
}

#[test]
fn npy_rows_still_load_through_the_data_loaders() {
    let dir = temp_dir("rows");
    let vals: Vec<f64> = (0..12).map(|i| i as f64 / 4.0).collect();
    let want: Vec<f32> = vals.iter().map(|&v| v as f32).collect();
    let p = write(&dir, "r.npy", &npy(&[4, 3], &vals));
    let d = load_npy(&p).expect("rows");
    assert_eq!((d.dim, d.values.clone()), (3, want.clone()));
    assert_eq!(load_path(&p).expect("rows"), d);
    // One wide row read in big chunks: chunks hold what the file has.
    let wide: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
    let p = write(&dir, "w.npy", &npy(&[1, 100_000], &wide));
    let chunks: Vec<Dataset> = flow_train::data::chunks(&p, 1 << 20)
        .expect("chunks")
        .collect::<Result<_, _>>()
        .expect("chunk");
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].values, wide);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_files_are_errors_naming_the_file() {
    let dir = temp_dir("hostile");
    let u8s = [0u8; 24];
    let good_idx = idx(0x08, &[2, 3, 4], &u8s);
    let good_gz = gzip(&good_idx);
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // IDX
        ("empty-idx3-ubyte", vec![], "truncated"),
        ("short-idx3-ubyte", vec![0, 0, 8], "truncated"),
        ("magic.idx3-ubyte", [&[1u8, 2, 8, 3][..], &[0; 12]].concat(), "bad magic"),
        ("type.idx", idx(0x0a, &[1, 2, 2], &[0; 4]), "element type 0x0a"),
        ("labels.idx1-ubyte", idx(0x08, &[4], &[1, 2, 3, 4]), "1 dimensions"),
        ("rank5.idx", idx(0x08, &[1, 1, 1, 1, 1], &[0]), "5 dimensions"),
        ("header.idx", vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0], "truncated"),
        ("few.idx", idx(0x08, &[2, 3, 4], &[0; 23]), "need 24"),
        ("many.idx", idx(0x08, &[2, 3, 4], &[0; 25]), "need 24"),
        ("wide.idx", idx(0x0d, &[2, 3, 4], &[0; 24]), "need 96"),
        ("huge.idx", idx(0x08, &[u32::MAX, u32::MAX, 2], &[0; 8]), "need"),
        ("overflow.idx", idx(0x0e, &[u32::MAX; 4], &[0; 8]), "2^64"),
        ("zero.idx", idx(0x08, &[0, 28, 28], &[]), "empty"),
        ("zeropixels.idx", idx(0x08, &[5, 0, 28], &[]), "empty"),
        (
            "nan.idx",
            idx(0x0d, &[1, 1, 2], &[[0u8; 4], f32::NAN.to_be_bytes()].concat()),
            "row 1, column 2",
        ),
        (
            "inf.idx",
            idx(0x0e, &[1, 1, 1], &1e300f64.to_be_bytes()),
            "finite",
        ),
        // gzip
        ("corrupt.gz", vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff], "gzip"),
        ("cut.idx3-ubyte.gz", good_gz[..good_gz.len() / 2].to_vec(), "gzip"),
        ("crc.gz", {
            let mut g = good_gz.clone();
            let n = g.len();
            g[n - 6] ^= 0xff; // the CRC-32 in the trailer
            g
        }, "gzip"),
        // npy
        ("magic.npy", b"NUMPY\x01\x00garbage".to_vec(), "bad magic"),
        ("short.npy", b"\x93NUM".to_vec(), "truncated"),
        ("version.npy", b"\x93NUMPY\x09\x00\x10\x00".to_vec(), "version 9"),
        (
            "bighead.npy",
            [&b"\x93NUMPY\x02\x00"[..], &0xffff_fff0u32.to_le_bytes(), b"{}"].concat(),
            "truncated",
        ),
        (
            "hugeshape.npy",
            npy_raw("{'descr': '|u1', 'fortran_order': False, 'shape': (4611686018427387904, 4611686018427387904), }\n", &[0; 4]),
            "more elements",
        ),
        (
            // No element, however wide its rows: empty, and nothing of the rows' size made.
            "zeroshape.npy",
            npy_raw("{'descr': '<f8', 'fortran_order': False, 'shape': (0, 1099511627776, 1099511627776), }\n", &[]),
            "the array is empty",
        ),
        (
            "bigdim.npy",
            npy_raw("{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999999999999, 1), }\n", &[]),
            "64 bits",
        ),
        (
            "twoshapes.npy",
            npy_raw("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), 'shape': (2,), }\n", &[0; 8]),
            "one `shape`",
        ),
        (
            "noshape.npy",
            npy_raw("{'descr': '<f8', 'fortran_order': False, }\n", &[0; 8]),
            "one `shape`",
        ),
        (
            "nested.npy",
            npy_raw(&format!("{}{}", "[".repeat(5000), "]".repeat(5000)), &[]),
            "nested",
        ),
        (
            "escape.npy",
            npy_raw("{'descr': '<f8', 'fortran_order': False, 'sh\\x61pe': (1,), 'shape': (1,)}\n", &[0; 8]),
            "ASCII",
        ),
        (
            "notdict.npy",
            npy_raw("{'descr': '<f8', 'shape': (1, 1, 1), }\n", &[0; 8]),
            "not a readable .npy",
        ),
        ("rank1.npy", npy(&[4], &[1u8, 2, 3, 4]), "1 dimensions"),
        ("rank5.npy", npy(&[1, 1, 1, 2, 2], &[1u8, 2, 3, 4]), "5 dimensions"),
        (
            "bool.npy",
            npy_raw("{'descr': '|b1', 'fortran_order': False, 'shape': (1, 2, 2), }\n", &[0; 4]),
            "unsupported",
        ),
        (
            "complex.npy",
            npy_raw("{'descr': '<c8', 'fortran_order': False, 'shape': (1, 1, 1), }\n", &[0; 8]),
            "unsupported",
        ),
        (
            "struct.npy",
            npy_raw("{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (1, 1, 1), }\n", &[0; 8]),
            "unsupported",
        ),
        (
            "fortran.npy",
            npy_raw("{'descr': '|u1', 'fortran_order': True, 'shape': (2, 1, 2, 2), }\n", &[0; 8]),
            "Fortran",
        ),
        (
            "shortdata.npy",
            npy_raw("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 2), }\n", &[0; 31]),
            "needs 32",
        ),
        (
            "longdata.npy",
            npy_raw("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 2), }\n", &[0; 33]),
            "needs 32",
        ),
        ("empty.npy", npy::<u8>(&[0, 28, 28], &[]), "empty"),
        ("nan.npy", npy(&[1, 2, 2], &[0f32, 1.0, f32::NAN, 3.0]), "row 1, column 3"),
        // CSV
        ("bad.csv", b"1,2\n3,x\n".to_vec(), "line 2"),
        ("blank.csv", b"".to_vec(), "no data rows"),
    ];
    // Gzip of a hostile file is still hostile.
    cases.push((
        "few.idx.gz",
        gzip(&idx(0x08, &[2, 3, 4], &[0; 23])),
        "need 24",
    ));
    for (name, bytes, want) in cases {
        let path = write(&dir, name, &bytes);
        let e = match load_images(&path) {
            Ok(got) => panic!("{name}: loaded {:?}", got.dims),
            Err(e) => e.to_string(),
        };
        assert!(e.starts_with(&path.display().to_string()), "{name}: {e}");
        assert!(e.contains(want), "{name}: `{e}` lacks `{want}`");
        assert!(!e.contains('\n'), "{name}: one line: {e}");
    }
    // The 2-D loader shares the npy guard.
    let p = dir.join("hugeshape.npy");
    let e = load_npy(&p).expect_err("hostile").to_string();
    assert!(e.contains("more elements"), "{e}");
    let p = dir.join("bighead.npy");
    let e = load_npy(&p).expect_err("hostile").to_string();
    assert!(
        e.contains("truncated: the .npy header claims 4294967280 bytes"),
        "{e}"
    );
    // A missing file names itself too.
    let p = dir.join("missing.npy");
    let e = load_images(&p).expect_err("missing").to_string();
    assert!(e.starts_with(&p.display().to_string()), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
