//! Pictures and continuous image rows through the `flow` binary: density, conditional
//! density and sample plots with a fixed `--range` and the same pixel size;
//! `--range` checked; `flow log-prob --dequantized` reproducing normflows' Glow
//! log-probs, with `encode`/`decode --dequantized` on the same rows; the flag refused
//! where it does not apply, and values outside [0, 1) named by file and row.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use candle::{DType, Device, Tensor};

fn flow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(args)
        .output()
        .expect("run flow")
}

/// Runs `flow args`, which must succeed; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = flow(args);
    assert!(
        out.status.success(),
        "flow {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `flow args`, which must fail with exit 2 and `needle` in its one-line error.
fn fails(args: &[&str], needle: &str) {
    let out = flow(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "flow {args:?}: {err}");
    assert!(
        err.contains(needle),
        "flow {args:?}: expected `{needle}` in {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "flow {args:?}: {err}");
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("flows-plots-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fn path(name: &str) -> String {
    dir().join(name).to_string_lossy().into_owned()
}

/// A small 2-D flow conditional on the moon a point is on, trained once.
fn moons() -> &'static str {
    static MODEL: OnceLock<String> = OnceLock::new();
    MODEL.get_or_init(|| {
        let m = path("moons.safetensors");
        ok(&[
            "train",
            "--data",
            "moons",
            "--with-labels",
            "--context-dim",
            "1",
            "--n",
            "2000",
            "--steps",
            "150",
            "--hidden",
            "32",
            "--layers",
            "4",
            "--batch",
            "256",
            "--out",
            &m,
        ]);
        m
    })
}

/// A PNG's width and height, from its signature and IHDR chunk.
fn png_size(file: &str) -> (u32, u32) {
    let bytes = std::fs::read(file).expect("png");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{file}: not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR", "{file}: no IHDR first");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    (be(16), be(20))
}

#[test]
fn conditional_densities_with_one_range_are_comparable_pictures() {
    let m = moons();
    let range = "--range=-1.5,2.5,-1,1.5";
    let (c0, c1, free) = (path("c0.png"), path("c1.png"), path("free.png"));
    for (context, out) in [("0", &c0), ("1", &c1)] {
        ok(&[
            "plot",
            "--model",
            m,
            "--context",
            context,
            range,
            "--out",
            out,
        ]);
    }
    ok(&["plot", "--model", m, "--context", "0", "--out", &free]);
    let size = png_size(&c0);
    assert_eq!(png_size(&c1), size);
    assert_eq!(png_size(&free), size);
    // The plot area and the colour bar beside it.
    assert!(size.0 > size.1 && size.1 >= 600, "{size:?}");
    let bytes = |p: &str| std::fs::read(p).expect("png");
    assert_ne!(bytes(&c0), bytes(&c1), "the two conditions drew the same");
    assert_ne!(bytes(&c0), bytes(&free), "--range changed nothing");
}

#[test]
fn samples_plot_over_a_given_range() {
    let m = moons();
    let (s, a, b) = (path("s.csv"), path("sa.png"), path("sb.png"));
    let sample = |png: &str, range: Option<&str>| {
        let mut args = vec![
            "sample",
            "--model",
            m,
            "--n",
            "400",
            "--context",
            "1",
            "--out",
            &s,
            "--plot",
            png,
        ];
        args.extend(range);
        ok(&args);
    };
    sample(&a, Some("--range=-3,3,-3,3"));
    sample(&b, None);
    assert_eq!(png_size(&a), png_size(&b));
    assert_ne!(std::fs::read(&a).ok(), std::fs::read(&b).ok());
}

#[test]
fn a_range_is_four_finite_numbers_each_min_below_its_max() {
    let m = moons();
    let out = path("never.png");
    for (range, needle) in [
        (
            "1,2,3",
            "expected xmin,xmax,ymin,ymax (four numbers), got 3 values",
        ),
        ("0,1,0,nan", "`nan` is not a finite number"),
        ("0,1,0,1e999", "`1e999` is not a finite number"),
        ("2,1,0,1", "xmin 2 must be below xmax 1"),
        ("-1,1,0,0", "ymin 0 must be below ymax 0"),
    ] {
        let flag = format!("--range={range}");
        fails(
            &["plot", "--model", m, "--context", "0", &flag, "--out", &out],
            needle,
        );
        let csv = path("never.csv");
        let sample = [
            "sample",
            "--model",
            m,
            "--n",
            "5",
            "--context",
            "0",
            "--out",
            &csv,
        ];
        let mut args = sample.to_vec();
        args.extend(["--plot", &out, &flag]);
        fails(&args, needle);
    }
    assert!(!Path::new(&out).exists());
    // A range without a picture to apply it to.
    let csv = path("never.csv");
    fails(
        &[
            "sample",
            "--model",
            m,
            "--n",
            "5",
            "--context",
            "0",
            "--out",
            &csv,
            "--range=0,1,0,1",
        ],
        "--range applies to a picture",
    );
    assert!(!Path::new(&csv).exists());
}

const GLOW: &str = "normflows_Glow_L2_K2_c1_8x8_h16";

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/interop")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// normflows' Glow imported once.
fn glow() -> &'static str {
    static MODEL: OnceLock<String> = OnceLock::new();
    MODEL.get_or_init(|| {
        let m = path("glow.safetensors");
        let weights = fixture(&format!("{GLOW}.safetensors"));
        ok(&[
            "import",
            "--from",
            "normflows",
            "--input",
            &weights,
            "--out",
            &m,
        ]);
        m
    })
}

/// The fixture's rows `x` (in [0, 1)) and normflows' `log_prob` of each.
fn glow_io() -> (Vec<Vec<f32>>, Vec<f64>) {
    let io: HashMap<String, Tensor> =
        candle::safetensors::load(fixture(&format!("{GLOW}_io.safetensors")), &Device::Cpu)
            .expect("io fixture");
    let x = io["x"]
        .to_dtype(DType::F32)
        .and_then(|x| x.to_vec2::<f32>())
        .expect("x");
    let lp = io["log_prob"]
        .to_dtype(DType::F64)
        .and_then(|l| l.to_vec1::<f64>())
        .expect("log_prob");
    (x, lp)
}

fn write_csv(file: &str, rows: &[Vec<f32>]) {
    let header: Vec<String> = (0..rows[0].len()).map(|j| format!("x{j}")).collect();
    let mut text = header.join(",") + "\n";
    for row in rows {
        let row: Vec<String> = row.iter().map(f32::to_string).collect();
        text += &(row.join(",") + "\n");
    }
    std::fs::write(file, text).expect("csv");
}

fn read_csv(file: &str) -> Vec<Vec<f64>> {
    std::fs::read_to_string(file)
        .expect("csv")
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().expect("number")).collect())
        .collect()
}

/// The number before `label` in `text`.
fn number_before(text: &str, label: &str) -> f64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no `{label}` in {text}"));
    text[..at]
        .split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number before `{label}` in {text}"))
}

/// normflows' `log_prob` takes the continuous rows that `--dequantized` reads: each
/// row's score matches to 1e-4 nats (absolute, as the importer's own check: the
/// log-probs are tens of nats, so this is also tighter than 1e-4 relative), and the
/// summary's bits/dim is on the same continuous scale, −mean / (64·ln 2).
#[test]
fn dequantized_log_prob_reproduces_normflows_glow() {
    let m = glow();
    let (x, want) = glow_io();
    assert_eq!((x.len(), x[0].len()), (16, 64));
    let (xs, lp) = (path("glow_x.csv"), path("glow_lp.csv"));
    write_csv(&xs, &x);
    let summary = ok(&[
        "log-prob",
        "--model",
        m,
        "--input",
        &xs,
        "--dequantized",
        "--out",
        &lp,
    ]);
    let got: Vec<f64> = read_csv(&lp).into_iter().map(|r| r[0]).collect();
    assert_eq!(got.len(), want.len());
    for (row, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-4, "row {row}: {g} vs normflows' {w}");
    }
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    eprintln!("{GLOW}: log-prob --dequantized off by at most {worst:.2e} nats");
    let mean = want.iter().sum::<f64>() / want.len() as f64;
    let printed = number_before(&summary, "nats  NLL");
    assert!((printed - mean).abs() <= 1e-3, "{summary} vs mean {mean}");
    let bpd = number_before(&summary, "bits/dim");
    let want_bpd = -mean / (64.0 * std::f64::consts::LN_2);
    assert!((bpd - want_bpd).abs() <= 1e-3, "{summary} vs {want_bpd}");

    // The same rows are not pixel values: without the flag they are refused.
    fails(
        &["log-prob", "--model", m, "--input", &xs],
        "is not a pixel value",
    );
    fails(
        &[
            "log-prob",
            "--model",
            m,
            "--input",
            &xs,
            "--dequantized",
            "--seed",
            "3",
        ],
        "--dequantized rows take none",
    );
}

/// `encode --dequantized` reads the rows `log-prob --dequantized` scores, and
/// `decode --dequantized` gives them back.
#[test]
fn encode_and_decode_take_the_same_continuous_rows() {
    let m = glow();
    let (x, _) = glow_io();
    let (xs, z, back) = (
        path("codec_x.csv"),
        path("codec_z.csv"),
        path("codec_back.csv"),
    );
    write_csv(&xs, &x);
    ok(&[
        "encode",
        "--model",
        m,
        "--input",
        &xs,
        "--dequantized",
        "--out",
        &z,
    ]);
    ok(&[
        "decode",
        "--model",
        m,
        "--input",
        &z,
        "--dequantized",
        "--out",
        &back,
    ]);
    let back = read_csv(&back);
    assert_eq!(back.len(), 16);
    for (r, s) in x.iter().zip(&back) {
        for (u, v) in r.iter().zip(s) {
            assert!((f64::from(*u) - v).abs() <= 1e-4, "{u} came back as {v}");
        }
    }
    // Latents far out decode outside [0, 1): --dequantized says which row.
    let far: Vec<Vec<f32>> = (0..3)
        .map(|i| vec![if i == 2 { 40.0 } else { 0.0 }; 64])
        .collect();
    let (zf, out) = (path("codec_far.csv"), path("codec_never.csv"));
    write_csv(&zf, &far);
    fails(
        &[
            "decode",
            "--model",
            m,
            "--input",
            &zf,
            "--dequantized",
            "--out",
            &out,
        ],
        &format!("{zf}: row 3: decodes to"),
    );
    assert!(!Path::new(&out).exists());
}

#[test]
fn values_outside_the_unit_interval_name_the_file_and_row() {
    let m = glow();
    let (mut x, _) = glow_io();
    x[2][5] = 1.0;
    let (bad, out) = (path("glow_bad.csv"), path("glow_never.csv"));
    write_csv(&bad, &x);
    let needle = format!("{bad}: row 3, column 6: 1 is outside [0, 1)");
    for command in ["log-prob", "encode"] {
        fails(
            &[
                command,
                "--model",
                m,
                "--input",
                &bad,
                "--dequantized",
                "--out",
                &out,
            ],
            &needle,
        );
    }
    x[2][5] = -0.25;
    write_csv(&bad, &x);
    fails(
        &["log-prob", "--model", m, "--input", &bad, "--dequantized"],
        &format!("{bad}: row 3, column 6: -0.25 is outside [0, 1)"),
    );
    assert!(!Path::new(&out).exists());
}

#[test]
fn dequantized_is_refused_on_a_2d_model() {
    let m = moons();
    let (data, out) = (path("refused.csv"), path("refused_out.csv"));
    ok(&[
        "data",
        "moons",
        "--n",
        "20",
        "--with-labels",
        "--out",
        &data,
    ]);
    let needle = "--dequantized applies to image models";
    fails(
        &["log-prob", "--model", m, "--input", &data, "--dequantized"],
        needle,
    );
    for command in ["encode", "decode"] {
        fails(
            &[
                command,
                "--model",
                m,
                "--input",
                &data,
                "--dequantized",
                "--out",
                &out,
            ],
            needle,
        );
    }
    assert!(!Path::new(&out).exists());
}

#[test]
fn a_range_is_refused_on_an_image_model() {
    let grid = path("grid_never.png");
    fails(
        &[
            "sample",
            "--model",
            glow(),
            "--n",
            "4",
            "--out",
            &grid,
            "--range=0,1,0,1",
        ],
        "--range applies to 2-D pictures, not to an image model's grid",
    );
    assert!(!Path::new(&grid).exists());
}
