//! `flow train`'s flags through the real binary: a flag applies to the family it is
//! given for or is refused, naming the families that take it; a resumed run keeps its
//! settings; sizes are bounded before anything is allocated; the data are checked; a
//! run that trains nothing leaves `--out` as it was; image losses are in the units of
//! `flow log-prob`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use flow_core::limits::{MAX_BINS, MAX_COMPONENTS, MAX_DIM, MAX_HIDDEN, MAX_LAYERS};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("flows-flags-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fn path(name: &str) -> String {
    dir().join(name).to_string_lossy().into_owned()
}

fn file(name: &str, text: &str) -> String {
    let p = path(name);
    std::fs::write(&p, text).expect("write");
    p
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

/// `flow train ARGS --out OUT` fails with exit 2 and the one line `expect`, and writes
/// no `OUT`.
fn refused<S: AsRef<str> + std::fmt::Debug>(args: &[S], expect: &str) {
    let out = path("never.safetensors");
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let o = flow(&[&["train"], &args[..], &["--out", &out]].concat());
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(o.status.code(), Some(2), "flow train {args:?}: {err}");
    assert_eq!(lines.len(), 1, "flow train {args:?}: not one line: {err}");
    assert!(
        lines[0].contains(expect),
        "flow train {args:?}: expected `{expect}` in {err}"
    );
    assert!(!Path::new(&out).exists(), "flow train {args:?} wrote --out");
}

/// `flow train ARGS --out OUT` succeeds; its standard error.
fn trains<S: AsRef<str> + std::fmt::Debug>(args: &[S], out: &str) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let o = flow(&[&["train"], &args[..], &["--out", out]].concat());
    let err = stderr(&o);
    assert!(o.status.success(), "flow train {args:?}: {err}");
    err
}

/// `a` then `b`, owned.
fn with(a: &[&str], b: &[&str]) -> Vec<String> {
    a.iter().chain(b).map(|s| s.to_string()).collect()
}

const MOONS: [&str; 4] = ["--data", "moons", "--n", "200"];

#[test]
fn a_flag_for_another_family_is_refused_naming_the_families_that_take_it() {
    let moons = |extra: &[&str]| with(&MOONS, extra);
    let digits = |extra: &[&str]| with(&["--data", "digits"], extra);
    for (args, expect) in [
        (
            moons(&["--flow", "nice", "--coupling", "affine"]),
            "--coupling applies to realnvp, not nice",
        ),
        (
            moons(&["--coupling", "additive", "--scale", "exp"]),
            "--scale shapes an affine coupling's scale; --coupling additive has none",
        ),
        (
            moons(&["--scale", "tanh", "--clamp", "2", "--coupling", "additive"]),
            "--scale shapes an affine coupling's scale; --coupling additive has none",
        ),
        (
            moons(&["--coupling", "additive", "--clamp", "2"]),
            "--clamp shapes an affine coupling's scale; --coupling additive has none",
        ),
        (
            digits(&["--flow", "glow", "--bins", "8"]),
            "--bins applies to nsf and nsf-ar, not glow",
        ),
        (
            digits(&["--flow", "glow", "--hidden", "3"]),
            "--hidden applies to realnvp, nice, nsf, nsf-ar, maf and iaf, not glow",
        ),
        (
            digits(&["--base", "diag"]),
            "--base applies to realnvp, nice, nsf, nsf-ar, maf and iaf, not glow",
        ),
        (
            moons(&["--flow", "maf", "--nets", "joint"]),
            "--nets applies to realnvp and nice, not maf",
        ),
        (
            moons(&["--order", "random"]),
            "--order applies to nsf-ar, maf and iaf, not realnvp",
        ),
        (
            moons(&["--flow", "nsf", "--depth", "2"]),
            "--depth applies to glow, not nsf",
        ),
        (
            moons(&["--flow", "nsf", "--image", "2x1x1"]),
            "--image applies to glow, realnvp-image and tarflow, not nsf",
        ),
        (
            moons(&["--flow", "nsf-ar", "--scale", "tanh"]),
            "--scale applies to realnvp, maf, iaf and tarflow, not nsf-ar",
        ),
        (
            moons(&["--scale", "exp", "--clamp", "2"]),
            "--clamp bounds the soft-clamp and tanh scales, not --scale exp",
        ),
        (
            moons(&["--schedule", "constant", "--lr-decay", "0.9"]),
            "--lr-decay applies to --schedule exp",
        ),
        (
            moons(&["--warmup", "5"]),
            "--warmup applies to --schedule cosine",
        ),
        (
            moons(&["--val-fraction", "0", "--patience", "3"]),
            "--val-every and --patience score a validation set: give --val, or a --val-fraction above 0",
        ),
        (
            moons(&["--val-fraction", "1"]),
            "--val-fraction: the validation fraction must lie in [0, 1), got 1",
        ),
        (
            moons(&["--val", "v.csv", "--val-fraction", "0.2"]),
            "--val-fraction holds rows out when no --val file is given",
        ),
        (
            moons(&["--bounds", "-2:3"]),
            "--bounds gives 1 entries for 2 data columns: give one LOW:HIGH per column",
        ),
        (
            moons(&["--bounds", "-2:3,1:nan"]),
            "--bounds entry 2 `1:nan`: a bound must be finite in f32",
        ),
        (
            moons(&["--bounds", "-2:3,1:-1"]),
            "--bounds entry 2 `1:-1`: the lower bound 1 is not below the upper bound -1",
        ),
        (
            moons(&["--bounds", "-0.5:3,-2:2"]),
            "moons: row 2, column 1: -1.049148 lies outside the model's bounds -0.5:3 (ends excluded)",
        ),
        (
            digits(&["--n", "5"]),
            "--n and --noise apply to the built-in 2-D data sets",
        ),
    ] {
        refused(&args, expect);
    }
}

#[test]
fn help_names_each_flags_families_and_their_configurations_defaults() {
    let o = flow(&["train", "--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    let line = |flag: &str| -> String {
        let mut lines = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(flag));
        lines.nth(1).unwrap_or_default().to_string()
    };
    assert!(
        line("--bins").contains(&format!(
            "[nsf and nsf-ar; default {}]",
            flow_nsf::DEFAULT_BINS
        )),
        "{}",
        line("--bins")
    );
    assert!(
        line("--hidden ").contains(&format!(
            "default {} for realnvp, nice, nsf and nsf-ar, {} for maf and iaf]",
            flow_realnvp::RealNvpConfig::default().hidden,
            flow_maf::MafConfig::default().hidden
        )),
        "{}",
        line("--hidden ")
    );
    assert!(
        line("--depth").contains(&format!("[glow; default {}]", flow_glow::SMALL_DEPTH)),
        "{}",
        line("--depth")
    );
    assert!(
        line("--coupling").contains("[realnvp; default affine]"),
        "{}",
        line("--coupling")
    );
}

#[test]
fn sizes_and_values_from_flags_are_bounded() {
    let pixels = file("pixels.csv", "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n");
    let moons = |extra: &[&str]| with(&MOONS, extra);
    let digits = |extra: &[&str]| with(&["--data", "digits"], extra);
    let over = |flag: &str, v: &str, max: usize| {
        (
            format!("--{flag}"),
            v.to_string(),
            format!("--{flag} {v} is more than the largest allowed, {max}"),
        )
    };
    for (flag, v, expect) in [
        over("hidden", "99999999999", MAX_HIDDEN),
        over("layers", "99999999999", MAX_LAYERS),
        over("hidden-layers", "99999999999", MAX_LAYERS),
    ] {
        refused(&moons(&[&flag, &v]), &expect);
    }
    let (flag, v, expect) = over("bins", "99999", MAX_BINS);
    refused(&moons(&["--flow", "nsf", &flag, &v]), &expect);
    for (flag, v, expect) in [
        over("depth", "99999999999", MAX_LAYERS),
        over("scales", "99999999999", MAX_LAYERS),
        over("channels", "99999999999", MAX_HIDDEN),
    ] {
        refused(&digits(&[&flag, &v]), &expect);
    }
    refused(
        &["--data", "moons", "--n", "99999999999"],
        "--n 99999999999 is more than the largest allowed",
    );
    refused(
        &moons(&["--batch", "99999999999"]),
        "--batch 99999999999 is more than the largest allowed",
    );
    refused(
        &moons(&["--base", "mixture:99999999999"]),
        &format!("more components than the largest allowed, {MAX_COMPONENTS}"),
    );
    // 2305843009213693954·8 wraps to 16 in 64 bits, the values of a row of pixels.csv.
    refused(
        &[
            "--data",
            &pixels,
            "--flow",
            "glow",
            "--image",
            "2305843009213693954x8x1",
        ],
        &format!("more values per image than the largest allowed, {MAX_DIM}"),
    );
    // Finite in f64, not in f32 (or not positive there).
    for (flag, extra) in [
        ("--tail-bound=1e300", &["--flow", "nsf"][..]),
        ("--tail-bound=1e-300", &["--flow", "nsf"][..]),
        ("--clamp=1e300", &[][..]),
        ("--lr=1e300", &[][..]),
        ("--clip-grad=1e39", &[][..]),
    ] {
        let name = flag.split('=').next().unwrap_or_default();
        refused(
            &moons(&[extra, &[flag]].concat()),
            &format!("{name} must be positive and finite in f32"),
        );
    }
    // Values that are finite in f64 but put the data or the bounded layer past f32.
    refused(
        &moons(&["--noise", "1e39"]),
        "noise 1e39 puts points beyond the range of f32",
    );
    refused(
        &moons(&["--bounds=-1e39:1e39,-5:5"]),
        "a bound must be finite in f32",
    );
    refused(
        &moons(&["--bounds=-3e38:3e38,-5:5"]),
        "the interval -3e38:3e38 is wider than f32 holds",
    );
    let data = path("f32-noise.csv");
    let o = flow(&[
        "data", "moons", "--n", "5", "--noise", "1e39", "--out", &data,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!std::path::Path::new(&data).exists());
}

#[test]
fn a_resumed_run_refuses_flags_that_would_change_it_and_records_a_longer_one() {
    let base = [
        &MOONS[..],
        &["--hidden", "8", "--layers", "2", "--batch", "100"],
    ]
    .concat();
    let first = path("resume-first.safetensors");
    trains(&[&base[..], &["--steps", "5"]].concat(), &first);
    let resume = |extra: &[&str]| {
        with(
            &[&MOONS[..], &["--steps", "10", "--resume", first.as_str()]].concat(),
            extra,
        )
    };
    for flag in [
        &["--lr", "0.01"][..],
        &["--flow", "maf"],
        &["--hidden", "16"],
        &["--layers", "3"],
        &["--batch", "64"],
        &["--seed", "3"],
        &["--optimizer", "adamax"],
        &["--schedule", "constant"],
        &["--base", "diag"],
        &["--no-standardize"],
        &["--scale", "tanh"],
    ] {
        refused(
            &resume(flag),
            &format!(
                "{} would change the resumed run, which keeps its own settings",
                flag[0]
            ),
        );
    }
    refused(
        &resume(&["--stop-at", "5"]),
        &format!("--stop-at 5: {first} is at step 5 already; give a later step"),
    );
    refused(
        &with(&MOONS, &["--stop-at", "0"]),
        "--stop-at must be at least 1",
    );
    refused(
        &resume(&["--bins", "3"]),
        "--bins applies to nsf and nsf-ar, not realnvp",
    );
    // Repeating the settings is no change; the longer run is honoured and recorded.
    let second = path("resume-second.safetensors");
    let err = trains(
        &resume(
            &[
                &base[4..],
                &["--lr", "0.001", "--seed", "0", "--flow", "realnvp"],
            ]
            .concat(),
        ),
        &second,
    );
    assert!(err.contains("resuming at step 5 of 10"), "{err}");
    let ck = flow_io::load(Path::new(&second)).expect("checkpoint");
    let cfg: serde_json::Value =
        serde_json::from_str(&ck.extra["train_config"]).expect("train_config");
    assert_eq!(cfg["duration"]["steps"], 10, "{cfg}");
    let state: serde_json::Value =
        serde_json::from_str(&ck.extra["train_state"]).expect("train_state");
    assert_eq!(state["step"], 10, "{state}");
}

#[test]
fn one_dimensional_data_with_a_coupling_flow_names_the_families_that_fit_it() {
    let one = file("one.csv", "0.5\n1.5\n-0.25\n2.0\n0.75\n-1.0\n");
    for family in ["realnvp", "nice", "nsf"] {
        refused(
            &["--data", &one, "--flow", family],
            &format!(
                "--flow {family} couples one part of each row to the other and needs at least 2 features, but {one} has 1: in one dimension use nsf-ar, maf or iaf"
            ),
        );
    }
    // The families it names do train on it.
    for family in ["maf", "nsf-ar"] {
        trains(
            &[
                "--data", &one, "--flow", family, "--hidden", "4", "--steps", "3",
            ],
            &path(&format!("one-{family}.safetensors")),
        );
    }
}

#[test]
fn degenerate_data_are_refused_or_warned_about() {
    let single = file("single.csv", "1,2\n");
    refused(
        &["--data", &single],
        &format!("{single}: 1 row: a density cannot be fitted to a single point"),
    );
    let few = file("few.csv", "1,2\n2,1\n3,0\n0,3\n");
    refused(
        &["--data", &few, "--val-fraction", "0.75"],
        &format!("{few}: --val-fraction 0.75 holds out 3 of 4 rows, leaving 1 to train on"),
    );
    let same = file("same.csv", "1,2\n1,2\n1,2\n");
    refused(
        &["--data", &same],
        &format!("{same}: all 3 rows are the same point"),
    );
    // A constant column trains, but says what standardising it does.
    let constant = file("constant.csv", "1,5\n2,5\n3,5\n4,5\n0,5\n");
    let err = trains(
        &["--data", &constant, "--hidden", "8", "--steps", "3"],
        &path("constant.safetensors"),
    );
    assert!(
        err.contains(&format!(
            "warning: {constant}: column 2 is constant: standardised with a standard deviation of 1 in place of 0"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "warning: {constant}: 5 rows, fewer than a batch of 512: every step trains on all 5"
        )),
        "{err}"
    );
    // Data fit for the batch raise no warning.
    let err = trains(
        &[
            "--data", "moons", "--n", "600", "--hidden", "8", "--layers", "2", "--steps", "2",
        ],
        &path("quiet.safetensors"),
    );
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn a_run_that_trains_nothing_leaves_an_existing_out_as_it_was() {
    // A folder of its own, where no other test writes.
    let own = dir().join("failed-run");
    std::fs::create_dir_all(&own).expect("dir");
    let out = own
        .join("precious.safetensors")
        .to_string_lossy()
        .into_owned();
    trains(
        &[
            &MOONS[..],
            &["--hidden", "8", "--layers", "2", "--steps", "3"],
        ]
        .concat(),
        &out,
    );
    let before = std::fs::read(&out).expect("model");
    // Adam moves every weight by about the learning rate: after one step at 1e30 the
    // loss overflows, and the only finite weights are the untrained ones.
    let o = flow(&[
        "train", "--data", "moons", "--n", "200", "--hidden", "8", "--layers", "2", "--lr", "1e30",
        "--steps", "20", "--out", &out,
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("error: training failed: the loss became non-finite at step")
            && l.ends_with(&format!(
                "and no step before it trained finite weights; {out} was not written (a lower --lr or a --clip-grad may help)"
            ))),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&out).expect("model"),
        before,
        "a failed run replaced --out"
    );
    let stray: Vec<_> = std::fs::read_dir(&own)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
}

/// The number after `label` in `text`.
fn number_after(text: &str, label: &str) -> f64 {
    text.split(label)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` in {text}"))
}

#[test]
fn digits_train_glow_and_report_losses_in_the_units_of_log_prob() {
    let test = path("digits-test.csv");
    let o = flow(&["data", "digits", "--split", "test", "--out", &test]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model = path("glow.safetensors");
    let metrics = path("glow-metrics.jsonl");
    // No --flow: the digits are images, and Glow is the image family it picks.
    let err = trains(
        &[
            "--data",
            "digits",
            "--scales",
            "1",
            "--depth",
            "1",
            "--channels",
            "8",
            "--batch",
            "64",
            "--steps",
            "20",
            "--val",
            &test,
            "--val-every",
            "10",
            "--metrics",
            &metrics,
        ],
        &model,
    );
    assert!(err.contains("training glow on 1500 samples"), "{err}");
    // 64 pixels of 17 levels: the dequantised density's NLL is 64·ln 17 nats lower.
    let gap = 64.0 * 17f64.ln();
    assert!(err.contains(&format!("NLL + 64·ln 17 ({gap:.2})")), "{err}");
    let trained = number_after(&err, "best validation NLL ");
    let o = flow(&["log-prob", "--model", &model, "--input", &test]);
    assert!(o.status.success(), "{}", stderr(&o));
    let scored = number_after(&String::from_utf8_lossy(&o.stdout), "  NLL ");
    // The two draw their dequantisation noise apart; the units differ by 181 nats.
    assert!(
        (trained - scored).abs() < 1.0,
        "training reports {trained}, log-prob {scored}"
    );
    // The metrics carry the same units: their best validation score is the one printed.
    let best = std::fs::read_to_string(&metrics)
        .expect("metrics")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["val_nll"].as_f64())
        .fold(f64::INFINITY, f64::min);
    assert!((best - trained).abs() < 1e-3, "{best} vs {trained}");
}
