//! Hostile input, run through the real `flow` binary: every case must end with exit
//! code 2 and one line naming the problem — no panic, no backtrace, no file written.

use std::{path::PathBuf, process::Command, sync::OnceLock};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("flows-hostile-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fn path(name: &str) -> String {
    dir().join(name).to_string_lossy().into_owned()
}

fn file(name: &str, bytes: &[u8]) -> String {
    let p = path(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

/// A small valid model, trained once.
fn model() -> &'static str {
    static MODEL: OnceLock<String> = OnceLock::new();
    MODEL.get_or_init(|| {
        let m = path("good.safetensors");
        let out = Command::new(env!("CARGO_BIN_EXE_flow"))
            .args([
                "train", "--data", "moons", "--n", "300", "--steps", "3", "--hidden", "8",
                "--layers", "2", "--out", &m,
            ])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        m
    })
}

/// A safetensors file from a header (JSON) and data bytes.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

/// The good model's header and data, for surgical damage.
fn good_parts() -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(model()).expect("model");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("json");
    (header, bytes[8 + n..].to_vec())
}

fn with_header(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let (mut h, data) = good_parts();
    edit(&mut h);
    file(name, &safetensors(&h.to_string(), &data))
}

fn with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    with_header(name, |h| {
        let cfg = h["__metadata__"]["model_config"]
            .as_str()
            .expect("config")
            .to_string();
        let mut cfg: serde_json::Value = serde_json::from_str(&cfg).expect("json");
        edit(&mut cfg);
        h["__metadata__"]["model_config"] = serde_json::Value::String(cfg.to_string());
    })
}

fn first_tensor(h: &serde_json::Value) -> String {
    h.as_object()
        .expect("object")
        .keys()
        .find(|k| k.starts_with("layers."))
        .expect("a layer tensor")
        .clone()
}

struct Case {
    what: &'static str,
    args: Vec<String>,
    /// Text the message must contain.
    expect: &'static str,
}

fn case(what: &'static str, args: &[&str], expect: &'static str) -> Case {
    Case {
        what,
        args: args.iter().map(|s| s.to_string()).collect(),
        expect,
    }
}

fn log_prob(m: &str, input: &str) -> Vec<String> {
    ["log-prob", "--model", m, "--input", input]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn thirty_and_more_hostile_inputs() {
    let m = model();
    let data = file("data.csv", b"0.1,0.2\n0.3,0.4\n");
    let out = path("out.csv");
    let mut cases: Vec<Case> = Vec::new();
    let mut model_case = |what: &'static str, file: String, expect: &'static str| {
        let mut c = case(what, &[], expect);
        c.args = log_prob(&file, &data);
        cases.push(c);
    };

    // Checkpoints.
    model_case(
        "empty file",
        file("empty.safetensors", b""),
        "not a safetensors file",
    );
    model_case(
        "shorter than its length field",
        file("short.safetensors", b"\x05\0\0"),
        "not a safetensors file",
    );
    model_case(
        "header longer than the file",
        file(
            "long.safetensors",
            &safetensors("{}", b"")[..8]
                .iter()
                .copied()
                .chain(*b"{}")
                .collect::<Vec<_>>()
                .iter()
                .enumerate()
                .map(|(i, b)| if i == 0 { 200 } else { *b })
                .collect::<Vec<_>>(),
        ),
        "not a safetensors file",
    );
    model_case(
        "header claims terabytes",
        file(
            "huge.safetensors",
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, b'{', b'}'],
        ),
        "not a safetensors file",
    );
    model_case(
        "header is not JSON",
        file("notjson.safetensors", &safetensors("{not json", b"")),
        "not a safetensors file",
    );
    model_case(
        "header is a JSON list",
        file("list.safetensors", &safetensors("[1,2,3]", b"")),
        "not a safetensors file",
    );
    model_case(
        "offsets out of range",
        file(
            "range.safetensors",
            &safetensors(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                &[0; 8],
            ),
        ),
        "not a safetensors file",
    );
    model_case(
        "overlapping offsets",
        file(
            "overlap.safetensors",
            &safetensors(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
        ),
        "not a safetensors file",
    );
    model_case(
        "dtype and shape disagree with the byte length",
        file(
            "bytes.safetensors",
            &safetensors(
                r#"{"a":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        "not a safetensors file",
    );
    model_case(
        "unknown dtype",
        file(
            "dtype.safetensors",
            &safetensors(
                r#"{"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        "not a safetensors file",
    );
    model_case(
        "truncated checkpoint",
        {
            let b = std::fs::read(m).expect("model");
            file("trunc.safetensors", &b[..b.len() - 7])
        },
        "not a safetensors file",
    );
    model_case(
        "plain safetensors without metadata",
        file(
            "plain.safetensors",
            &safetensors(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
        ),
        "not a flows checkpoint",
    );
    model_case(
        "config metadata missing",
        with_header("nocfg.safetensors", |h| {
            h["__metadata__"]
                .as_object_mut()
                .expect("meta")
                .remove("model_config");
        }),
        "model_config",
    );
    model_case(
        "config is not JSON",
        with_header("badcfg.safetensors", |h| {
            h["__metadata__"]["model_config"] = serde_json::Value::String("{oops".into());
        }),
        "invalid model configuration",
    );
    model_case(
        "config of the wrong shape",
        with_config("wrongcfg.safetensors", |c| {
            c["dim"] = serde_json::json!("two")
        }),
        "invalid model configuration",
    );
    model_case(
        "config mask of the wrong length",
        with_config("maskcfg.safetensors", |c| {
            c["layers"][0]["mask"] = serde_json::json!([true, false, true]);
        }),
        "layer 0: mask of 3 features in a model of 2",
    );
    model_case(
        "unknown format version",
        with_header("version.safetensors", |h| {
            h["__metadata__"]["format_version"] = serde_json::Value::String("99".into());
        }),
        "format version 99",
    );
    model_case(
        "another format",
        with_header("format.safetensors", |h| {
            h["__metadata__"]["format"] = serde_json::Value::String("other".into());
        }),
        "format is `other`",
    );
    model_case(
        "config with fewer layers than tensors",
        with_config("fewer.safetensors", |c| {
            c["layers"].as_array_mut().expect("layers").pop();
        }),
        "unexpected tensor",
    );
    model_case(
        "config wider than the tensors",
        with_config("wider.safetensors", |c| {
            c["layers"][0]["conditioner"]["net"]["hidden"] = serde_json::json!([9]);
        }),
        "has shape",
    );
    model_case(
        "a hidden layer of width zero",
        with_config("zero_width.safetensors", |c| {
            c["layers"][0]["conditioner"]["net"]["hidden"] = serde_json::json!([0]);
        }),
        "width 0",
    );
    model_case(
        "tensor renamed away",
        with_header("renamed.safetensors", |h| {
            let name = first_tensor(h);
            let t = h
                .as_object_mut()
                .expect("object")
                .remove(&name)
                .expect("tensor");
            h.as_object_mut()
                .expect("object")
                .insert("zz.renamed".into(), t);
        }),
        "missing",
    );
    model_case(
        "tensor of another dtype",
        with_header("intdtype.safetensors", |h| {
            let name = first_tensor(h);
            h[&name]["dtype"] = serde_json::json!("I32");
        }),
        "expected a float type",
    );
    {
        let (h, mut d) = good_parts();
        let name = first_tensor(&h);
        let start = h[&name]["data_offsets"][0].as_u64().expect("offset") as usize;
        d[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        model_case(
            "NaN weights",
            file("nan.safetensors", &safetensors(&h.to_string(), &d)),
            "NaN or infinite",
        );
        d[start..start + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        model_case(
            "infinite weights",
            file("inf.safetensors", &safetensors(&h.to_string(), &d)),
            "NaN or infinite",
        );
    }
    model_case(
        "model path is a folder",
        dir().to_string_lossy().into_owned(),
        "Is a directory",
    );
    model_case(
        "model file missing",
        path("absent.safetensors"),
        "absent.safetensors",
    );

    // Data files.
    let data_case = |what: &'static str, name: &str, bytes: &[u8], expect: &'static str| {
        let mut c = case(what, &[], expect);
        c.args = log_prob(m, &file(name, bytes));
        c
    };
    cases.push(data_case("empty data file", "e.csv", b"", "no data rows"));
    cases.push(data_case(
        "header only",
        "h.csv",
        b"x0,x1\n",
        "no data rows",
    ));
    cases.push(data_case(
        "ragged rows",
        "r.csv",
        b"1,2\n3,4\n5\n",
        "line 3",
    ));
    cases.push(data_case(
        "non-numeric cell",
        "n.csv",
        b"1,2\n3,four\n",
        "line 2",
    ));
    cases.push(data_case("NaN cell", "nan.csv", b"1,2\nnan,4\n", "line 2"));
    cases.push(data_case(
        "infinite cell",
        "inf.csv",
        b"1,2\n3,-inf\n",
        "line 2",
    ));
    cases.push(data_case(
        "header in the middle",
        "mid.csv",
        b"1,2\nx0,x1\n3,4\n",
        "line 2",
    ));
    cases.push(data_case(
        "wrong width for the model",
        "w.csv",
        b"1,2,3\n",
        "the model has 2 features",
    ));
    let huge: Vec<u8> = std::iter::repeat_n(b"1.5,".as_slice(), 200_000)
        .flatten()
        .copied()
        .chain(*b"1\n")
        .collect();
    cases.push(data_case(
        "a huge single line",
        "huge.csv",
        &huge,
        "the model has 2 features",
    ));
    cases.push(data_case(
        "garbage .npy",
        "g.npy",
        b"\x93NUMPY garbage",
        "g.npy",
    ));

    // Flags.
    let train = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["train", "--data", "moons", "--n", "100", "--out"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(path("never.safetensors"));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    for (what, extra, expect) in [
        ("zero steps", &["--steps", "0"][..], "--steps"),
        ("negative steps", &["--steps", "-5"][..], "-5"),
        ("zero batch", &["--batch", "0"][..], "--batch"),
        ("zero hidden", &["--hidden", "0"][..], "--hidden"),
        ("zero layers", &["--layers", "0"][..], "--layers"),
        ("negative learning rate", &["--lr", "-0.1"][..], "lr"),
        ("zero clamp", &["--clamp", "0"][..], "--clamp"),
        ("unknown device", &["--device", "tpu"][..], "unknown device"),
        (
            "unknown activation",
            &["--activation", "swish"][..],
            "swish",
        ),
        (
            "zero checkpoint interval",
            &["--checkpoint-every", "0"][..],
            "--checkpoint-every",
        ),
        (
            "resume from nothing",
            &["--resume", "/no/such/ckpt.safetensors"][..],
            "ckpt.safetensors",
        ),
    ] {
        let mut c = case(what, &[], expect);
        c.args = train(extra);
        cases.push(c);
    }
    let stateless = with_header("stateless.safetensors", |h| {
        if let Some(meta) = h["__metadata__"].as_object_mut() {
            meta.remove("train_state");
        }
    });
    cases.push(case(
        "resume from a model without training state",
        &[
            "train",
            "--data",
            "moons",
            "--resume",
            &stateless,
            "--out",
            &path("r.safetensors"),
        ],
        "holds no training state",
    ));
    cases.push(case(
        "resume on other data",
        &[
            "train",
            "--data",
            "circles",
            "--n",
            "300",
            "--resume",
            m,
            "--out",
            &path("r2.safetensors"),
        ],
        "the training data differ",
    ));
    cases.push(case(
        "zero temperature",
        &[
            "sample",
            "--model",
            m,
            "--n",
            "3",
            "--temperature",
            "0",
            "--out",
            &out,
        ],
        "temperature",
    ));
    let moons_csv = file("seeded.csv", b"x0,x1\n0,1\n1,0\n0.5,0.5\n");
    cases.push(case(
        "a seed for an image model's noise, given a model of points",
        &["log-prob", "--model", m, "--input", &moons_csv, "--seed", "3"],
        "--seed draws the dequantisation noise of an image model's pixels; this model is not an image model",
    ));
    cases.push(case(
        "a seed for the digits, which are not drawn",
        &["data", "digits", "--seed", "5", "--out", &out],
        "digits take --split, not --n, --noise, --with-labels or --seed",
    ));
    cases.push(case(
        "a temperature past f32",
        &[
            "sample",
            "--model",
            m,
            "--n",
            "3",
            "--temperature",
            "1e300",
            "--out",
            &out,
        ],
        "--temperature must be positive and finite in f32",
    ));
    cases.push(case(
        "negative temperature",
        &[
            "sample",
            "--model",
            m,
            "--n",
            "3",
            "--temperature",
            "-1",
            "--out",
            &out,
        ],
        "temperature",
    ));
    cases.push(case(
        "output in a missing folder",
        &[
            "sample",
            "--model",
            m,
            "--n",
            "3",
            "--out",
            "/no/such/folder/s.csv",
        ],
        "does not exist",
    ));
    cases.push(case(
        "import of a non-safetensors file",
        &[
            "import",
            "--from",
            "nflows",
            "--input",
            &data,
            "--out",
            &path("i.safetensors"),
        ],
        "not a safetensors file",
    ));

    // Image flows.
    let never = path("never.safetensors");
    let digits_rows = file(
        "pixels.csv",
        b"0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n16,15,14,13,12,11,10,9,8,7,6,5,4,3,2,1\n",
    );
    let train_image = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["train", "--flow", "glow", "--steps", "1", "--out", &never]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let mut image_case = |what: &'static str, extra: &[&str], expect: &'static str| {
        let mut c = case(what, &[], expect);
        c.args = train_image(extra);
        cases.push(c);
    };
    image_case(
        "an image shape that does not match the rows",
        &["--data", &digits_rows, "--image", "3x3x1"],
        "has 9 values per image, but the rows",
    );
    image_case(
        "a malformed image shape",
        &["--data", &digits_rows, "--image", "4by4"],
        "expected HxWxC",
    );
    image_case(
        "a pixel value outside [0, L)",
        &[
            "--data",
            &digits_rows,
            "--image",
            "4x4x1",
            "--pixel-levels",
            "16",
        ],
        "16 is not a pixel value",
    );
    image_case(
        "a squeeze on odd sizes",
        &[
            "--data",
            &file("odd.csv", b"0,1,2,3,4,5,6,7,8\n"),
            "--image",
            "3x3x1",
            "--scales",
            "1",
        ],
        "divisible by 2",
    );
    image_case(
        "more scales than the image allows",
        &["--data", "digits", "--scales", "4"],
        "--scales 4 on 8x8x1 images",
    );
    image_case(
        "one pixel level",
        &["--data", "digits", "--pixel-levels", "1"],
        "at least 2",
    );
    cases.push(case(
        "an image shape for a flow of points",
        &[
            "train", "--data", "moons", "--flow", "nsf", "--image", "2x1x1", "--out", &never,
        ],
        "--image applies to glow, realnvp-image and tarflow, not nsf",
    ));

    assert!(cases.len() >= 30, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let out = Command::new(env!("CARGO_BIN_EXE_flow"))
            .args(&c.args)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let ok = out.status.code() == Some(2)
            && err.contains(c.expect)
            && !err.contains("panicked")
            && !err.contains("backtrace")
            && lines.len() == 1;
        if !ok {
            failures.push(format!("{}: status {:?}: {err}", c.what, out.status.code()));
        }
    }
    assert!(
        !PathBuf::from(path("never.safetensors")).exists(),
        "a rejected run wrote a model"
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn rows_whose_log_prob_overflows_are_named_in_a_warning() {
    let m = model();
    // Values near f32's largest overflow the standardisation and the networks.
    let input = file("overflowing.csv", b"x0,x1\n0,0\n3e38,3e38\n0.5,0.5\n");
    let out = Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(["log-prob", "--model", m, "--input", &input])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("1 row(s), the first row 2, have a NaN log-prob"),
        "{err}"
    );
}
