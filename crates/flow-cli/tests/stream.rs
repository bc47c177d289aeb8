//! `flow train --stream`: rows read from the file a chunk at a time train as rows held
//! in memory do when one chunk holds the file, resume bit for bit mid-epoch, and bad
//! files or flags are one-line errors that write nothing.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-stream-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn flow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(args)
        .output()
        .expect("run flow")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A `.npy` file of `rows` rows of `dim` little-endian f32 values.
fn write_npy(path: &Path, dim: usize, values: &[f32]) {
    let rows = values.len() / dim;
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    // Magic, version and length take 10 bytes; the header ends in a newline at a
    // multiple of 64.
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

/// 300 rows of 3 values on a curved band, seeded; the last column is 0 or 1 (a
/// label, the context of a conditional flow).
fn data(path: &Path) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32
    };
    let mut values = Vec::new();
    for _ in 0..300 {
        let (a, b) = (uniform() * 4.0 - 2.0, uniform() - 0.5);
        values.extend([a, a * a + 0.3 * b, f32::from(u8::from(b > 0.0))]);
    }
    write_npy(path, 3, &values);
}

/// Model tensors (training state excluded) as raw f32 bits, by name.
fn weights(p: &Path) -> BTreeMap<String, Vec<u32>> {
    let ck = flow_io::load(p).expect("checkpoint");
    ck.tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("train_state."))
        .map(|(k, t)| {
            let v = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("f32");
            (k.clone(), v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

/// A small RealNVP and its batch.
const REALNVP: [&str; 6] = ["--batch", "64", "--hidden", "8", "--layers", "2"];

fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let (d, o) = (s(data), s(out));
    let mut args = vec![
        "train", "--data", &d, "--out", &o, "--steps", "30", "--seed", "7",
    ];
    args.extend_from_slice(extra);
    flow(&args)
}

#[test]
fn one_chunk_that_holds_the_file_trains_as_rows_held_in_memory() {
    let d = dir("one-chunk");
    let file = d.join("d.npy");
    data(&file);
    let val = d.join("val.npy");
    data(&val);
    let v = ["--val", &s(&val), "--val-every", "10"];
    let v = [&REALNVP[..], &v].concat();
    // Unconditional (the 3 columns) and conditional (the last column the context),
    // the context standardised (by a pass over the file when streamed) or not.
    for cond in [
        &[][..],
        &["--context-dim", "1"][..],
        &["--context-dim", "1", "--no-standardize"][..],
    ] {
        let held = d.join("held.safetensors");
        let o = train(&file, &held, &[&v[..], cond].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let streamed = d.join("streamed.safetensors");
        let o = train(
            &file,
            &streamed,
            &[&v[..], cond, &["--stream", "--stream-chunk", "300"]].concat(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(weights(&held), weights(&streamed), "{cond:?}");
        // Smaller chunks visit the rows in another order: other weights.
        let chunked = d.join("chunked.safetensors");
        let o = train(
            &file,
            &chunked,
            &[&v[..], cond, &["--stream", "--stream-chunk", "50"]].concat(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert_ne!(weights(&held), weights(&chunked), "{cond:?}");
    }
}

#[test]
fn idx_images_stream_as_held_pixels_train() {
    let d = dir("idx");
    // 120 images of 8×8 seeded bytes, IDX: magic 00 00 08 03, then big-endian sizes.
    let file = d.join("images-idx3-ubyte");
    let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 120, 0, 0, 0, 8, 0, 0, 0, 8];
    let mut state = 0x9e37_79b9u32;
    bytes.extend((0..120 * 64).map(|_| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 24) as u8
    }));
    std::fs::write(&file, bytes).expect("write");
    let glow = [
        "--flow",
        "glow",
        "--scales",
        "1",
        "--depth",
        "2",
        "--channels",
        "8",
        "--batch",
        "32",
        // Held rows are held out to validate on unless told not to; streamed ones never.
        "--val-fraction",
        "0",
    ];
    let held = d.join("held.safetensors");
    let o = train(&file, &held, &glow);
    assert!(o.status.success(), "{}", stderr(&o));
    let streamed = d.join("streamed.safetensors");
    let one_chunk = ["--stream", "--stream-chunk", "120"];
    let o = train(&file, &streamed, &[&glow[..], &one_chunk].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(weights(&held), weights(&streamed));
}

#[test]
fn interrupted_mid_epoch_and_resumed_equals_uninterrupted() {
    let d = dir("resume");
    let file = d.join("d.npy");
    data(&file);
    // 300 rows in chunks of 50: batches cross chunks, and 30 steps of 64 cross epochs.
    let st = [
        &REALNVP[..],
        &["--stream", "--stream-chunk", "50", "--context-dim", "1"],
    ]
    .concat();
    let full = d.join("full.safetensors");
    let o = train(&file, &full, &st);
    assert!(o.status.success(), "{}", stderr(&o));

    let part = d.join("part.safetensors");
    let o = train(&file, &part, &[&st[..], &["--stop-at", "11"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = flow_io::load(&part).expect("checkpoint");
    let state: serde_json::Value = serde_json::from_str(&ck.extra["train_state"]).expect("state");
    // Step 11 of 4 steps an epoch: epoch 2, 3 batches of 64 (192 rows) in, which is
    // in the 4th chunk of the epoch's order (3 × 50 = 150 rows before it), 42 rows in.
    assert_eq!(
        (&state["epoch"], &state["pos"], &state["stream"]),
        (
            &serde_json::json!(2),
            &serde_json::json!(192),
            &serde_json::json!({"chunk_rows": 50, "chunk": 3, "row": 42})
        )
    );
    // Resumed without repeating the stream flags: the checkpoint streams as written.
    let r = s(&part);
    let o = train(
        &file,
        &part,
        &[&REALNVP[..], &["--context-dim", "1", "--resume", &r]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(weights(&full), weights(&part));

    // Another chunk size would change the order: refused.
    let o = train(
        &file,
        &d.join("x.safetensors"),
        &["--resume", &s(&full), "--stream-chunk", "60"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o).trim(),
        "error: --stream-chunk would change the resumed run, which streamed chunks of 50 rows"
    );
}

#[test]
fn bad_files_and_flags_are_one_line_errors_that_write_nothing() {
    let d = dir("hostile");
    let file = d.join("d.npy");
    data(&file);
    // The header says 300 rows; the file ends after 299 and a half.
    let bytes = std::fs::read(&file).expect("read");
    let truncated = d.join("short.npy");
    std::fs::write(&truncated, &bytes[..bytes.len() - 6]).expect("write");
    let csv = d.join("d.csv");
    std::fs::write(&csv, "1,2\n3,4\n").expect("write");
    let gz = d.join("d.npy.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).expect("write");
    let out = d.join("never.safetensors");
    let o = s(&out);
    let cases: [(Vec<String>, &str); 7] = [
        (
            vec![s(&truncated), "--stream".into()],
            "shape [300, 3] of 4-byte elements needs 3600 data bytes, the file holds 3594",
        ),
        (
            vec![s(&file), "--stream".into(), "--stream-chunk".into(), "0".into()],
            "--stream-chunk must be at least 1",
        ),
        (
            vec![
                s(&file),
                "--stream".into(),
                "--stream-chunk".into(),
                "1000000000000".into(),
            ],
            "--stream-chunk 1000000000000 is more than the largest allowed",
        ),
        (
            vec![s(&csv), "--stream".into()],
            "cannot be streamed: streaming reads .npy and uncompressed IDX files",
        ),
        (
            vec![s(&gz), "--stream".into()],
            "gzipped: streaming reads rows at their offsets, which compressed data lack; decompress it first (gunzip -k)",
        ),
        (
            vec!["moons".into(), "--stream".into()],
            "--stream reads a data file (.npy or IDX); `moons` is a built-in data set",
        ),
        (
            vec![s(&file), "--stream-chunk".into(), "10".into()],
            "--stream-chunk sets the chunk size of --stream, which was not given",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["train", "--data"];
        all.extend(args.iter().map(String::as_str));
        all.extend(["--out", &o, "--steps", "2"]);
        let r = flow(&all);
        let err = stderr(&r);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {o}");
    }
}
