//! Hostile files, run through the real `flow` binary: weights and checkpoints whose
//! contents are damaged, oversized or inconsistent. Each case must end with exit code 2
//! and one line naming the file and the problem, leave an existing output file with
//! its bytes, and leave no temporary file behind.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use safetensors::{tensor::TensorView, Dtype, SafeTensors};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("flows-hostile-files-{}", std::process::id()));
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

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/interop")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn flow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(args)
        .output()
        .expect("run flow")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small trained model, with its training state.
fn model() -> &'static str {
    static MODEL: OnceLock<String> = OnceLock::new();
    MODEL.get_or_init(|| {
        let m = path("good.safetensors");
        let o = flow(&[
            "train", "--data", "moons", "--n", "300", "--steps", "3", "--hidden", "8", "--layers",
            "2", "--out", &m,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        m
    })
}

/// The normflows Glow fixture imported: an image model (1×8×8).
fn glow() -> &'static str {
    static MODEL: OnceLock<String> = OnceLock::new();
    MODEL.get_or_init(|| {
        let m = path("glow.safetensors");
        let input = fixture("normflows_Glow_L2_K2_c1_8x8_h16.safetensors");
        let o = flow(&[
            "import",
            "--from",
            "normflows",
            "--input",
            &input,
            "--out",
            &m,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
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

/// A model file's header and data, for surgical damage.
fn parts(model: &str) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(model).expect("model");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("json");
    (header, bytes[8 + n..].to_vec())
}

/// `model` with the JSON held in metadata entry `key` edited.
fn with_metadata(
    model: &str,
    key: &str,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> String {
    let (mut h, data) = parts(model);
    let text = h["__metadata__"][key].as_str().expect("entry").to_string();
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("json");
    edit(&mut value);
    h["__metadata__"][key] = serde_json::Value::String(value.to_string());
    file(name, &safetensors(&h.to_string(), &data))
}

/// A raw tensor: dtype, shape, little-endian bytes.
type Raw = (Dtype, Vec<usize>, Vec<u8>);

/// A fixture's tensors, raw.
fn raw(name: &str) -> HashMap<String, Raw> {
    let bytes = std::fs::read(fixture(name)).expect("fixture");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_raw(name: &str, tensors: &HashMap<String, Raw>) -> String {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    file(
        name,
        &safetensors::serialize(views, None).expect("serialize"),
    )
}

fn f32s(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// Temporary files of `out` (`.NAME.tmp-PID`) left beside it.
fn leftovers(out: &str) -> Vec<String> {
    let name = Path::new(out)
        .file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned();
    std::fs::read_dir(dir())
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.tmp-")))
        .collect()
}

/// Runs `args`, whose `--out` is `out`, over an existing `out`: the command must fail
/// with exit 2 and one line containing every one of `expect`, and leave `out` with its
/// bytes and no temporary file.
fn refused(what: &str, args: &[&str], out: &str, expect: &[&str]) {
    let before = b"an existing file the command must not touch\n";
    std::fs::write(out, before).expect("write");
    let o = flow(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{what}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: not one line: {err}"
    );
    for e in expect {
        assert!(err.contains(e), "{what}: `{e}` not in: {err}");
    }
    assert_eq!(
        std::fs::read(out).expect("out"),
        before,
        "{what}: the existing output was touched"
    );
    assert_eq!(
        leftovers(out),
        Vec::<String>::new(),
        "{what}: temporary files left"
    );
}

fn import(from: &str, input: &str, out: &str) -> Vec<String> {
    ["import", "--from", from, "--input", input, "--out", out]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn an_import_with_nan_weights_names_the_input_and_writes_nothing() {
    let mut t = raw("zuko_RealNVP_f2_T4_h64x2.safetensors");
    let name = "transform.transforms.1.hyper.2.weight";
    let (_, shape, bytes) = t[name].clone();
    let mut values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    values[5] = f32::NAN;
    t.insert(name.into(), (Dtype::F32, shape, f32s(values)));
    let input = write_raw("zuko_nan.safetensors", &t);
    let out = path("nan_out.safetensors");
    let args = import("zuko", &input, &out);
    refused(
        "NaN weights",
        &strs(&args),
        &out,
        &[
            &input,
            &format!("tensor `{name}` holds NaN or infinite values"),
        ],
    );
}

#[test]
fn an_import_with_too_many_bins_names_the_input_and_writes_nothing() {
    // zuko's NSF over 2 features: 2 · (3K − 1) outputs for K bins, here K = 1001.
    let mut t = raw("zuko_NSF_f2_T3_K8_h64x2.safetensors");
    let out_rows = 2 * (3 * 1001 - 1);
    for l in 0..3 {
        let p = format!("transform.transforms.{l}.hyper.4");
        let weight = f32s((0..out_rows * 64).map(|i| ((i % 7) as f32 - 3.0) * 0.01));
        t.insert(
            format!("{p}.weight"),
            (Dtype::F32, vec![out_rows, 64], weight),
        );
        t.insert(
            format!("{p}.bias"),
            (Dtype::F32, vec![out_rows], f32s(vec![0.0; out_rows])),
        );
        t.insert(
            format!("{p}.mask"),
            (Dtype::BOOL, vec![out_rows, 64], vec![0; out_rows * 64]),
        );
    }
    let input = write_raw("zuko_1001_bins.safetensors", &t);
    let out = path("bins_out.safetensors");
    let args = import("zuko", &input, &out);
    refused(
        "1001 bins",
        &strs(&args),
        &out,
        &[&input, "1001 spline bins: more than the limit of 1000"],
    );
}

#[test]
fn an_import_of_weights_that_do_not_evaluate_writes_nothing() {
    // Finite weights, each 1e30 times too large: the exp-scaled couplings overflow.
    let mut t = raw("seed_stacked3.safetensors");
    for (_, (dtype, _, bytes)) in t.iter_mut() {
        assert_eq!(*dtype, Dtype::F32);
        let scaled: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) * 1e30)
            .collect();
        *bytes = f32s(scaled);
    }
    let input = write_raw("seed_huge.safetensors", &t);
    let out = path("huge_out.safetensors");
    let args = import("seed", &input, &out);
    refused(
        "weights that overflow",
        &strs(&args),
        &out,
        &[&input, "its weights do not make a working flow"],
    );
}

#[test]
fn nflows_spline_weights_say_which_tail_bound_they_assumed() {
    let input = fixture("nflows_RQcoupling_f2_L4_K8_h32_B2.safetensors");
    let out = path("nflows_spline.safetensors");
    let o = flow(&strs(&import("nflows", &input, &out)));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.lines().any(|l| l
            == "assumed tail bound 1 (nflows' default); the weights do not record it: give --tail-bound if the model was built with another"),
        "{err}"
    );
    assert!(
        err.contains("assumed hidden activation relu (nflows' default)"),
        "{err}"
    );
    // Given, nothing is assumed about it.
    let o = flow(
        &[
            &strs(&import("nflows", &input, &out))[..],
            &["--tail-bound", "3"],
        ]
        .concat(),
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("assumed tail bound"), "{err}");
}

#[test]
fn an_import_setting_that_no_layer_takes_is_refused_and_nothing_written() {
    let out = path("never-imported.safetensors");
    for (source, fixture_name, flag, value) in [
        ("seed", "seed_stacked3.safetensors", "--clamp", "2"),
        ("seed", "seed_stacked3.safetensors", "--tail-bound", "2"),
        (
            "zuko",
            "zuko_RealNVP_f2_T4_h64x2.safetensors",
            "--tail-bound",
            "4",
        ),
        (
            "nflows",
            "nflows_RQcoupling_f2_L4_K8_h32_B2.safetensors",
            "--clamp",
            "2",
        ),
    ] {
        let input = fixture(fixture_name);
        let base = import(source, &input, &out);
        let args = [&strs(&base)[..], &[flag, value]].concat();
        let o = flow(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "{flag} does not apply: no layer of these {source} weights takes it"
            )),
            "{err}"
        );
        assert!(!Path::new(&out).exists());
    }
}

#[test]
fn an_export_of_a_model_that_does_not_evaluate_writes_nothing() {
    // The seed fixture imported, then every weight scaled past what the model survives:
    // each tensor is finite, so only scoring the model finds it.
    let good = path("seed_model.safetensors");
    let input = fixture("seed_stacked3.safetensors");
    let o = flow(&strs(&import("seed", &input, &good)));
    assert!(o.status.success(), "{}", stderr(&o));
    let (h, data) = parts(&good);
    let scaled: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) * 1e30)
        .collect();
    let model = file(
        "seed_huge_model.safetensors",
        &safetensors(&h.to_string(), &f32s(scaled)),
    );
    let out = path("export_out.safetensors");
    refused(
        "export of a model that overflows",
        &["export", "--to", "seed", "--model", &model, "--out", &out],
        &out,
        &[&model, "its weights do not make a working flow"],
    );
}

#[test]
fn metadata_sizes_beyond_the_limits_are_one_line_errors() {
    let m = model();
    let data = file("data.csv", b"0.1,0.2\n0.3,0.4\n");
    let out = path("sizes_out.csv");
    let huge_dim = with_metadata(m, "model_config", "dim.safetensors", |c| {
        c["dim"] = serde_json::json!(1_000_000_000_000u64);
    });
    let huge_hidden = with_metadata(m, "model_config", "hidden.safetensors", |c| {
        c["layers"][0]["conditioner"]["net"]["hidden"] = serde_json::json!([99_999_999_999u64]);
    });
    let huge_mixture = with_metadata(m, "model_config", "mixture.safetensors", |c| {
        c["base"] = serde_json::json!({"kind": "mixture", "components": 99_999_999_999u64});
    });
    for (what, model, expect) in [
        (
            "dim",
            &huge_dim,
            "1000000000000 features: more than the limit of 16777216",
        ),
        (
            "hidden",
            &huge_hidden,
            "99999999999 hidden units in a layer: more than the limit of 65536",
        ),
        (
            "mixture",
            &huge_mixture,
            "99999999999 mixture components: more than the limit of 65536",
        ),
    ] {
        refused(
            what,
            &[
                "log-prob", "--model", model, "--input", &data, "--out", &out,
            ],
            &out,
            &[model, expect],
        );
        let o = flow(&["inspect", "--model", model]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "inspect {what}: {err}");
        assert!(err.contains(expect), "inspect {what}: {err}");
    }
}

#[test]
fn an_image_recipe_that_disagrees_with_its_layers_is_a_load_error() {
    let m = glow();
    let out = path("images_out.csv");
    let shape = with_metadata(m, "model_config", "glow_shape.safetensors", |c| {
        c["recipe"]["shape"] = serde_json::json!({"channels": 1, "height": 2, "width": 2});
    });
    let levels = with_metadata(m, "model_config", "glow_levels.safetensors", |c| {
        c["recipe"]["pixel_levels"] = serde_json::json!(0);
    });
    let overflow = with_metadata(m, "model_config", "glow_overflow.safetensors", |c| {
        c["recipe"]["shape"] =
            serde_json::json!({"channels": 2_305_843_009_213_693_954u64, "height": 8, "width": 1});
    });
    for (what, model, expect) in [
        (
            "shape",
            &shape,
            "the `glow` recipe gives 1×2×2 images, the layers take 1×8×8 images",
        ),
        (
            "pixel levels",
            &levels,
            "the `glow` recipe gives 0 pixel levels",
        ),
        (
            "overflowing shape",
            &overflow,
            "an image of 2305843009213693954 × 8 × 1 values: more than the limit of 16777216",
        ),
    ] {
        refused(
            what,
            &["sample", "--model", model, "--n", "2", "--out", &out],
            &out,
            &[model, expect],
        );
    }
}

#[test]
fn a_training_state_out_of_range_is_a_one_line_error() {
    let m = model();
    let out = path("resumed.safetensors");
    let resume = |state: &str| {
        vec![
            "train", "--data", "moons", "--n", "300", "--resume", state, "--out", &out,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let far = with_metadata(m, "train_state", "pos_max.safetensors", |s| {
        s["pos"] = serde_json::json!(u64::MAX);
    });
    refused(
        "pos = 2^64 - 1",
        &strs(&resume(&far)),
        &out,
        &[
            &far,
            "18446744073709551615 rows into the data (`pos`): more than the limit of",
        ],
    );
    let past = with_metadata(m, "train_state", "pos_past.safetensors", |s| {
        s["pos"] = serde_json::json!(100_000);
    });
    refused(
        "pos past the data",
        &strs(&resume(&past)),
        &out,
        &[
            &past,
            // 300 rows less the 30 held out to validate on.
            "the training state is at row 100000 of the data, which has 270",
        ],
    );
    let adam = with_metadata(m, "train_state", "adam.safetensors", |s| {
        s["adam_step"] = serde_json::json!(1_000_000);
    });
    refused(
        "adam step after the steps",
        &strs(&resume(&adam)),
        &out,
        &[
            &adam,
            "`adam_step` is 1000000, after the 3 steps taken (`step`)",
        ],
    );
}

#[test]
fn every_helper_here_reads_what_it_writes() {
    // The damaged copies differ from the good model only where edited.
    let m = model();
    let copy = with_metadata(m, "model_config", "copy.safetensors", |_| {});
    let o = flow(&["inspect", "--model", &copy]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(Path::new(&copy).exists());
}
