//! Faults during training: interruption and resumption give exactly the uninterrupted
//! run, a signal leaves a resumable checkpoint, a diverging run stops cleanly.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-faults-{}-{tag}", std::process::id()));
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

const RUN: [&str; 14] = [
    "train", "--data", "moons", "--n", "1500", "--steps", "90", "--hidden", "24", "--layers", "4",
    "--batch", "400", "--seed",
];

fn run(extra: &[&str], out: &Path) -> Output {
    let mut args: Vec<&str> = RUN.to_vec();
    args.push("11");
    args.extend_from_slice(extra);
    let o = s(out);
    args.extend(["--out", &o]);
    flow(&args)
}

#[test]
fn interrupted_and_resumed_equals_uninterrupted() {
    let d = dir("resume");
    let val = s(&d.join("val.csv"));
    assert!(
        flow(&["data", "moons", "--n", "300", "--seed", "5", "--out", &val])
            .status
            .success()
    );
    let v = ["--val", &val, "--val-every", "20"];
    let full = d.join("full.safetensors");
    assert!(run(&v, &full).status.success());

    // Stopped twice (once mid-epoch, once by checkpoints), resumed each time.
    let part = d.join("part.safetensors");
    let o = run(
        &[&v[..], &["--stop-at", "37", "--checkpoint-every", "10"]].concat(),
        &part,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = s(&part);
    let o = run(
        &[&v[..], &["--resume", &r, "--stop-at", "61"]].concat(),
        &part,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&[&v[..], &["--resume", &r]].concat(), &part);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        weights(&full),
        weights(&part),
        "resumed weights differ from the uninterrupted run"
    );

    // Resuming with other data is refused.
    let o = flow(&[
        "train",
        "--data",
        "circles",
        "--n",
        "1500",
        "--resume",
        &s(&d.join("part.safetensors")),
        "--out",
        &s(&d.join("x.safetensors")),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn low_memory_training_interrupted_and_resumed_equals_uninterrupted() {
    let d = dir("low-memory");
    let lm = ["--low-memory"];
    let full = d.join("full.safetensors");
    let o = run(&lm, &full);
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains("low memory: largest reconstruction error")
            && said.contains("activations kept for 0 of "),
        "{said}"
    );
    let part = d.join("part.safetensors");
    let o = run(&[&lm[..], &["--stop-at", "37"]].concat(), &part);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&[&lm[..], &["--resume", &s(&part)]].concat(), &part);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        weights(&full),
        weights(&part),
        "resumed low-memory weights differ from the uninterrupted run"
    );
}

#[test]
fn periodic_checkpoints_are_loadable_models() {
    let d = dir("periodic");
    let out = d.join("m.safetensors");
    let o = run(&["--checkpoint-every", "15", "--stop-at", "45"], &out);
    assert!(o.status.success());
    let lp = flow(&[
        "sample",
        "--model",
        &s(&out),
        "--n",
        "10",
        "--out",
        &s(&d.join("s.csv")),
    ]);
    assert!(
        lp.status.success(),
        "{}",
        String::from_utf8_lossy(&lp.stderr)
    );
    let stray: Vec<_> = std::fs::read_dir(&d)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
}

#[test]
fn a_diverging_run_stops_or_skips() {
    let d = dir("diverge");
    let out = d.join("m.safetensors");
    // A learning rate warmed up towards 3 with the unbounded exp scale trains for some
    // steps, then blows up.
    let bad = [
        "--scale",
        "exp",
        "--lr",
        "3",
        "--schedule",
        "cosine",
        "--warmup",
        "250",
        "--steps",
        "300",
    ];
    let mut args: Vec<&str> = vec![
        "train", "--data", "moons", "--n", "800", "--hidden", "16", "--layers", "4",
    ];
    args.extend(bad);
    let o_s = s(&out);
    let o = flow(&[&args[..], &["--out", &o_s]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("non-finite at step"), "{err}");
    // What was saved is the last finite model, and it works.
    let w = weights(&out);
    assert!(w.values().flatten().all(|b| f32::from_bits(*b).is_finite()));
    let o = flow(&[
        "sample",
        "--model",
        &o_s,
        "--n",
        "5",
        "--out",
        &s(&d.join("s.csv")),
    ]);
    assert!(o.status.success());

    let o = flow(&[&args[..], &["--skip-nonfinite", "--out", &o_s]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("non-finite batches skipped"), "{err}");
}

#[cfg(unix)]
#[test]
fn sigint_saves_a_resumable_checkpoint() {
    let d = dir("signal");
    let out = d.join("m.safetensors");
    let metrics = d.join("metrics.jsonl");
    let child = Command::new(env!("CARGO_BIN_EXE_flow"))
        .args([
            "train", "--data", "moons", "--n", "2000", "--steps", "100000", "--hidden", "16",
            "--layers", "2", "--batch", "64",
        ])
        .args(["--out", &s(&out), "--metrics", &s(&metrics)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until training is under way.
    let start = Instant::now();
    while std::fs::metadata(&metrics).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let o = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    let ck = flow_io::load(&out).expect("checkpoint after SIGINT");
    let step: serde_json::Value = serde_json::from_str(&ck.extra["train_state"]).expect("state");
    let step = step["step"].as_u64().expect("step");
    assert!(step > 0 && step < 100_000);
    // It resumes (and is stopped again a little later).
    let o = flow(&[
        "train",
        "--data",
        "moons",
        "--n",
        "2000",
        "--resume",
        &s(&out),
        "--stop-at",
        &(step + 5).to_string(),
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_finished_run_continues_to_more_steps_as_if_never_stopped() {
    let d = dir("continue");
    let run = |extra: &[&str], out: &Path| {
        let o = s(out);
        let mut args = vec![
            "train", "--data", "moons", "--n", "1200", "--hidden", "24", "--layers", "3",
            "--batch", "256", "--seed", "4", "--out", &o,
        ];
        args.extend_from_slice(extra);
        let r = flow(&args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    };
    // Validation every 25 steps: the first run's end (step 60) is off that schedule.
    let val = s(&d.join("val.csv"));
    let o = flow(&["data", "moons", "--n", "300", "--seed", "6", "--out", &val]);
    assert!(o.status.success());
    let v = ["--val", val.as_str(), "--val-every", "25"];
    let (part, full) = (d.join("part.safetensors"), d.join("full.safetensors"));
    run(
        &[&v[..], &["--steps", "60", "--checkpoint-every", "60"]].concat(),
        &part,
    );
    let p = s(&part);
    run(
        &[&v[..], &["--steps", "120", "--resume", &p]].concat(),
        &part,
    );
    run(&[&v[..], &["--steps", "120"]].concat(), &full);

    let points = s(&d.join("points.csv"));
    let o = flow(&[
        "data", "moons", "--n", "400", "--seed", "8", "--out", &points,
    ]);
    assert!(o.status.success());
    let log_probs = |model: &Path, name: &str| {
        let out = d.join(name);
        let o = flow(&[
            "log-prob",
            "--model",
            &s(model),
            "--input",
            &points,
            "--out",
            &s(&out),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out).expect("log-probs")
    };
    assert_eq!(
        log_probs(&part, "part.csv"),
        log_probs(&full, "full.csv"),
        "60 + 60 steps differ from 120 steps"
    );

    // Going back is refused, with a reason.
    let o = flow(&[
        "train",
        "--data",
        "moons",
        "--n",
        "1200",
        "--val",
        &val,
        "--steps",
        "50",
        "--resume",
        &p,
        "--out",
        &s(&d.join("back.safetensors")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("past the 50 steps"), "{err}");
}
