//! The output extension is the format: `.csv`, `.npy` and `.png` from the commands
//! that write rows, `.safetensors` for models and `.jsonl` for metrics; no output over
//! a file the command reads; the training file's column names in what comes back,
//! several samples per condition row, and no temporary file left by a signal.

use flow_core::limits::MAX_SAMPLES;
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

fn flow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(args)
        .output()
        .expect("run flow")
}

fn ok(args: &[&str]) {
    let out = flow(args);
    assert!(
        out.status.success(),
        "flow {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command that must fail with exit 2 and one line naming `want`; returns it.
fn fails(args: &[&str], want: &str) -> String {
    let out = flow(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "flow {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(want), "flow {args:?}: want `{want}` in {err}");
    err
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("flows-outputs-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fn path(name: &str) -> String {
    dir().join(name).to_string_lossy().into_owned()
}

/// Training rows with named columns: two parameters `theta0, theta1`, then three
/// observations `x0, x1, x2` as the condition.
fn data() -> &'static str {
    static DATA: OnceLock<String> = OnceLock::new();
    DATA.get_or_init(|| {
        let p = path("named.csv");
        let mut text = String::from("theta0,theta1,x0,x1,x2\n");
        for i in 0..300 {
            let t = i as f32 * 0.1;
            let (a, b) = (t.sin(), (0.7 * t).cos());
            let row = [a, b, a + b, a - b, (i % 5) as f32 / 5.0];
            let row: Vec<String> = row.iter().map(|v| v.to_string()).collect();
            text.push_str(&row.join(","));
            text.push('\n');
        }
        std::fs::write(&p, text).expect("write data");
        p
    })
}

/// A small conditional model of [`data`], trained once.
fn model() -> &'static str {
    static MODEL: OnceLock<String> = OnceLock::new();
    MODEL.get_or_init(|| {
        let m = path("named.safetensors");
        ok(&[
            "train",
            "--data",
            data(),
            "--context-dim",
            "3",
            "--steps",
            "20",
            "--hidden",
            "16",
            "--layers",
            "2",
            "--batch",
            "64",
            "--out",
            &m,
        ]);
        m
    })
}

/// A CSV file's header cells and rows.
fn read_csv(p: &str) -> (Vec<String>, Vec<Vec<f32>>) {
    let text = std::fs::read_to_string(p).expect("csv");
    let mut lines = text.lines();
    let header = lines
        .next()
        .expect("header")
        .split(',')
        .map(String::from)
        .collect();
    let rows = lines
        .map(|l| l.split(',').map(|v| v.parse().expect("number")).collect())
        .collect();
    (header, rows)
}

/// A `.npy` file parsed here, independently of the project's reader: its shape and
/// its little-endian f32 values. Checks the layout numpy expects: magic, version 1.0,
/// a header whose length makes the data start on a multiple of 64, ending in `\n`.
fn read_npy(p: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(p).expect("npy");
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{p}: magic and version");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let start = 10 + len;
    assert_eq!(start % 64, 0, "{p}: data aligned");
    let header = std::str::from_utf8(&bytes[10..start]).expect("ascii header");
    assert!(header.ends_with('\n'), "{header:?}");
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape");
    let shape: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("dimension"))
        .collect();
    let values: Vec<f32> = bytes[start..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(
        values.len() * 4,
        bytes.len() - start,
        "{p}: whole values only"
    );
    assert_eq!(
        values.len(),
        shape.iter().product::<usize>(),
        "{p}: {shape:?}"
    );
    (shape, values)
}

/// The width and height of a PNG file, after checking its signature, that the first
/// chunk is the header and that the file ends with the end chunk.
fn png_size(p: &str) -> (u32, u32) {
    let bytes = std::fs::read(p).expect("png");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{p}: signature");
    assert_eq!(&bytes[12..16], b"IHDR", "{p}: header chunk");
    assert_eq!(
        &bytes[bytes.len() - 8..bytes.len() - 4],
        b"IEND",
        "{p}: end chunk"
    );
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20))
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn samples_in_npy_are_the_csv_samples_with_the_training_columns() {
    let m = model();
    let (csv, npy) = (path("s.csv"), path("s.npy"));
    for out in [&csv, &npy] {
        ok(&[
            "sample",
            "--model",
            m,
            "--n",
            "40",
            "--seed",
            "3",
            "--context",
            "0.5,-0.25,0.2",
            "--out",
            out,
        ]);
    }
    let (header, rows) = read_csv(&csv);
    assert_eq!(header, names(&["theta0", "theta1", "x0", "x1", "x2"]));
    let (shape, values) = read_npy(&npy);
    assert_eq!(shape, [40, 5]);
    assert_eq!(values, rows.concat());
    for row in &rows {
        assert_eq!(row[2..], [0.5, -0.25, 0.2]);
    }
}

#[test]
fn encodings_decodings_and_log_probs_in_npy_have_numpys_shapes() {
    let m = model();
    let (z_csv, z_npy) = (path("z.csv"), path("z.npy"));
    ok(&["encode", "--model", m, "--input", data(), "--out", &z_csv]);
    ok(&["encode", "--model", m, "--input", data(), "--out", &z_npy]);
    let (header, z) = read_csv(&z_csv);
    // Latents are numbered; the condition keeps its names.
    assert_eq!(header, names(&["z0", "z1", "x0", "x1", "x2"]));
    let (shape, values) = read_npy(&z_npy);
    assert_eq!(shape, [300, 5]);
    assert_eq!(values, z.concat());

    // Decoding the .npy latents gives the training rows back, under their names.
    let back = path("back.csv");
    ok(&["decode", "--model", m, "--input", &z_npy, "--out", &back]);
    let (header, back) = read_csv(&back);
    assert_eq!(header, names(&["theta0", "theta1", "x0", "x1", "x2"]));
    let (_, rows) = read_csv(data());
    assert_eq!(back.len(), rows.len());
    for (a, b) in rows.iter().zip(&back) {
        assert!(
            (a[0] - b[0]).abs() < 1e-3 && (a[1] - b[1]).abs() < 1e-3,
            "{a:?} {b:?}"
        );
        assert_eq!(a[2..], b[2..]);
    }

    let (lp_csv, lp_npy) = (path("lp.csv"), path("lp.npy"));
    ok(&[
        "log-prob",
        "--model",
        m,
        "--input",
        data(),
        "--out",
        &lp_csv,
    ]);
    ok(&[
        "log-prob",
        "--model",
        m,
        "--input",
        data(),
        "--out",
        &lp_npy,
    ]);
    let (header, lp) = read_csv(&lp_csv);
    assert_eq!(header, names(&["log_prob"]));
    let (shape, values) = read_npy(&lp_npy);
    assert_eq!(shape, [300]);
    assert_eq!(values, lp.concat());
}

#[test]
fn data_sets_in_npy_are_the_csv_rows() {
    let (csv, npy) = (path("moons.csv"), path("moons.npy"));
    for out in [&csv, &npy] {
        ok(&[
            "data",
            "moons",
            "--n",
            "150",
            "--seed",
            "2",
            "--with-labels",
            "--out",
            out,
        ]);
    }
    let (header, rows) = read_csv(&csv);
    assert_eq!(header, names(&["x0", "x1", "label"]));
    let (shape, values) = read_npy(&npy);
    assert_eq!(shape, [150, 3]);
    assert_eq!(values, rows.concat());
}

#[test]
fn pngs_are_pictures() {
    let scatter = path("s.png");
    ok(&[
        "sample",
        "--model",
        model(),
        "--n",
        "200",
        "--context",
        "0,1,0.4",
        "--out",
        &scatter,
    ]);
    let (w, h) = png_size(&scatter);
    assert!(w >= 100 && h >= 100, "{w}x{h}");
    let moons = path("moons.png");
    ok(&["data", "moons", "--n", "300", "--out", &moons]);
    png_size(&moons);
    let digits = path("digits.png");
    ok(&["data", "digits", "--split", "test", "--out", &digits]);
    png_size(&digits);
    fails(
        &["data", "digits", "--out", &path("all-digits.png")],
        "a PNG grid holds at most 1024 images",
    );
    assert!(!Path::new(&path("all-digits.png")).exists());
}

#[test]
fn an_output_over_a_file_the_command_reads_is_refused_and_the_file_kept() {
    let m = model();
    let input = path("kept.csv");
    std::fs::copy(data(), &input).expect("copy");
    let same_input = format!("{}/./kept.csv", dir().display());
    let model_copy = path("kept.safetensors");
    std::fs::copy(m, &model_copy).expect("copy");
    let png = path("both.png");
    let cases: [(Vec<&str>, &str); 6] = [
        (
            vec![
                "encode",
                "--model",
                m,
                "--input",
                &input,
                "--out",
                &same_input,
            ],
            "is the file of --input",
        ),
        (
            vec!["log-prob", "--model", m, "--input", &input, "--out", &input],
            "is the file of --input",
        ),
        (
            vec![
                "export",
                "--to",
                "zuko",
                "--model",
                &model_copy,
                "--out",
                &model_copy,
            ],
            "is the file of --model",
        ),
        (
            vec![
                "import",
                "--from",
                "seed",
                "--input",
                &model_copy,
                "--out",
                &model_copy,
            ],
            "is the file of --input",
        ),
        (
            vec![
                "sample",
                "--model",
                m,
                "--n",
                "5",
                "--context",
                "0,0,0",
                "--out",
                &png,
                "--plot",
                &png,
            ],
            "is the file of --out",
        ),
        (
            vec![
                "plot",
                "--model",
                m,
                "--context",
                "0,0,0",
                "--data",
                &png,
                "--out",
                &png,
            ],
            "is the file of --data",
        ),
    ];
    let before = (
        std::fs::read(&input).expect("read"),
        std::fs::read(&model_copy).expect("read"),
    );
    for (args, want) in cases {
        fails(&args, want);
    }
    assert_eq!(std::fs::read(&input).expect("read"), before.0);
    assert_eq!(std::fs::read(&model_copy).expect("read"), before.1);
    assert!(!Path::new(&png).exists());
}

#[test]
fn an_unknown_extension_is_refused_before_any_work() {
    let m = model();
    let cases: [(Vec<&str>, &str, &str); 10] = [
        (
            vec!["sample", "--model", m, "--n", "5", "--context", "0,0,0"],
            "s.txt",
            "unknown extension `.txt`; the extension names the format: .csv, .npy or .png",
        ),
        (
            vec!["encode", "--model", m, "--input", data()],
            "z.json",
            "unknown extension `.json`; the extension names the format: .csv or .npy",
        ),
        (
            vec!["decode", "--model", m, "--input", data()],
            "x",
            "no extension; the extension names the format: .csv or .npy",
        ),
        (
            vec!["log-prob", "--model", m, "--input", data()],
            "lp.dat",
            "unknown extension `.dat`; the extension names the format: .csv or .npy",
        ),
        (
            vec!["data", "moons", "--n", "10"],
            "d.parquet",
            "unknown extension `.parquet`; the extension names the format: .csv, .npy or .png",
        ),
        (
            vec!["train", "--data", "moons", "--steps", "2"],
            "m.csv",
            "unknown extension `.csv`; the extension names the format: .safetensors",
        ),
        (
            vec!["plot", "--model", m, "--context", "0,0,0"],
            "p.csv",
            "unknown extension `.csv`; the extension names the format: .png",
        ),
        (
            vec!["export", "--to", "zuko", "--model", m],
            "e.npy",
            "unknown extension `.npy`; the extension names the format: .safetensors",
        ),
        (
            vec!["import", "--from", "zuko", "--input", m],
            "i",
            "no extension; the extension names the format: .safetensors",
        ),
        (
            vec![
                "train",
                "--data",
                "moons",
                "--steps",
                "2",
                "--metrics",
                "metrics.csv",
            ],
            "m.safetensors",
            "--metrics metrics.csv: unknown extension `.csv`; the extension names the format: .jsonl",
        ),
    ];
    for (args, name, want) in cases {
        let out = path(name);
        let mut args = args.clone();
        args.extend(["--out", &out]);
        let err = fails(&args, want);
        // The flag whose file is refused: --metrics in its own case, --out in the rest.
        let flag = match want.starts_with("--metrics") {
            true => "--metrics metrics.csv".to_string(),
            false => format!("--out {out}"),
        };
        assert!(err.contains(&flag), "{err}");
        assert!(!Path::new(&out).exists(), "{out} written");
    }
    // A PNG of the samples of a model that is not 2-D: the model is read first.
    let wide = path("wide.csv");
    std::fs::write(&wide, "a,b,c\n1,2,3\n2,3,1\n3,1,2\n0,1,1\n").expect("write");
    let three = path("three.safetensors");
    ok(&[
        "train", "--data", &wide, "--steps", "2", "--hidden", "8", "--layers", "2", "--batch", "4",
        "--out", &three,
    ]);
    fails(
        &[
            "sample",
            "--model",
            &three,
            "--n",
            "5",
            "--out",
            &path("three.png"),
        ],
        "a PNG scatter draws 2-D models; this one has 3 features",
    );
    assert!(!Path::new(&path("three.png")).exists());
    // Inputs too: the extension picks the reader.
    let text = path("rows.txt");
    std::fs::copy(data(), &text).expect("copy");
    fails(
        &["log-prob", "--model", m, "--input", &text],
        "unknown extension `.txt`: data files are .csv or .npy",
    );
    fails(
        &[
            "sample",
            "--model",
            m,
            "--context-file",
            &text,
            "--out",
            &path("never.csv"),
        ],
        "unknown extension `.txt`: data files are .csv or .npy",
    );
    assert!(!Path::new(&path("never.csv")).exists());
}

#[test]
fn context_file_with_n_draws_n_samples_per_row_tagged_with_the_row() {
    let m = model();
    let conditions = path("conditions.csv");
    std::fs::write(&conditions, "x0,x1,x2\n0,1,0.2\n1,-1,0.4\n0.5,0.5,0\n").expect("write");
    let (csv, npy) = (path("per-row.csv"), path("per-row.npy"));
    for out in [&csv, &npy] {
        ok(&[
            "sample",
            "--model",
            m,
            "--context-file",
            &conditions,
            "--n",
            "4",
            "--seed",
            "1",
            "--out",
            out,
        ]);
    }
    let (header, rows) = read_csv(&csv);
    assert_eq!(
        header,
        names(&["row", "theta0", "theta1", "x0", "x1", "x2"])
    );
    let given = [[0.0, 1.0, 0.2], [1.0, -1.0, 0.4], [0.5, 0.5, 0.0]];
    assert_eq!(rows.len(), 12);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], (i / 4) as f32, "{row:?}");
        assert_eq!(row[3..], given[i / 4], "{row:?}");
    }
    let (shape, values) = read_npy(&npy);
    assert_eq!(shape, [12, 6]);
    assert_eq!(values, rows.concat());
    // Without --n: one sample per row, untagged.
    ok(&[
        "sample",
        "--model",
        m,
        "--context-file",
        &conditions,
        "--out",
        &csv,
    ]);
    let (header, rows) = read_csv(&csv);
    assert_eq!(header, names(&["theta0", "theta1", "x0", "x1", "x2"]));
    assert_eq!(
        rows.iter().map(|r| r[2..].to_vec()).collect::<Vec<_>>(),
        given
    );
}

#[test]
fn n_is_bounded() {
    let out = path("huge.csv");
    let over = (MAX_SAMPLES + 1).to_string();
    fails(
        &[
            "sample",
            "--model",
            model(),
            "--n",
            &over,
            "--context",
            "0,0,0",
            "--out",
            &out,
        ],
        &format!("--n {over}: at most {MAX_SAMPLES} rows"),
    );
    fails(
        &["data", "moons", "--n", &over, "--out", &out],
        &format!("--n {over}: at most {MAX_SAMPLES} rows"),
    );
    assert!(!Path::new(&out).exists());
}

#[cfg(unix)]
#[test]
fn a_signal_while_sampling_leaves_no_temporary_file() {
    let sub = dir().join("signal");
    std::fs::create_dir_all(&sub).expect("dir");
    let out = sub.join("big.csv");
    let child = Command::new(env!("CARGO_BIN_EXE_flow"))
        .args([
            "sample",
            "--model",
            model(),
            "--n",
            &MAX_SAMPLES.to_string(),
        ])
        .args(["--context", "0,0,0", "--out"])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let tmp = sub.join(format!(".big.csv.tmp-{}", child.id()));
    // Wait until the samples are being written.
    let start = Instant::now();
    while std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "sampling did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let o = child.wait_with_output().expect("wait");
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let left: Vec<_> = std::fs::read_dir(&sub)
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn names_a_model_cannot_keep_are_numbered_with_a_warning() {
    let quoted = path("quoted.csv");
    std::fs::write(&quoted, "\"a,b\",c\n1,2\n2,1\n3,3\n0,1\n").expect("write");
    let m = path("quoted.safetensors");
    let out = flow(&[
        "train", "--data", &quoted, "--steps", "2", "--hidden", "8", "--layers", "2", "--batch",
        "4", "--out", &m,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("column names not kept (column name `a,b` holds a comma"),
        "{err}"
    );
    let s = path("quoted-samples.csv");
    ok(&["sample", "--model", &m, "--n", "3", "--out", &s]);
    assert_eq!(read_csv(&s).0, names(&["x0", "x1"]));
    fails(
        &[
            "sample",
            "--model",
            &m,
            "--n",
            "3",
            "--out",
            &s,
            "--plot",
            &path("p.jpg"),
        ],
        "p.jpg: unknown extension `.jpg`; the extension names the format: .png",
    );
}

/// A folder that takes no new file (`/proc`) fails before training, not after.
#[cfg(target_os = "linux")]
#[test]
fn an_output_folder_that_takes_no_file_fails_before_any_work() {
    let err = fails(
        &[
            "train",
            "--data",
            "moons",
            "--steps",
            "2",
            "--out",
            "/proc/flows-never.safetensors",
        ],
        "/proc/flows-never.safetensors",
    );
    assert!(!err.contains("training"), "{err}");
}
