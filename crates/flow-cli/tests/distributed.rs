//! `flow train --distributed`: refused where the build lacks the backend; with the
//! `mpi` feature and Open MPI's `mpirun`, two processes train the model one process
//! trains, a signal to one process stops both with one resumable checkpoint, Glow
//! with ActNorm agrees in bits/dim, and a process that hangs or dies ends the run
//! instead of leaving the others waiting.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn flow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(args)
        .output()
        .expect("run flow")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-dist-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn the_distributed_flags_go_together_and_need_their_backend() {
    let out = s(&dir("flags").join("m.safetensors"));
    let o = flow(&[
        "train",
        "--data",
        "moons",
        "--dist-timeout",
        "5",
        "--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: --dist-timeout applies to --distributed runs only\n"
    );
    let o = flow(&[
        "train",
        "--data",
        "moons",
        "--distributed",
        "mpi",
        "--dist-timeout",
        "0",
        "--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: --dist-timeout must be a positive number of seconds up to 31536000, got 0\n"
    );
    let o = flow(&[
        "train",
        "--data",
        "moons",
        "--distributed",
        "mpi",
        "--low-memory",
        "--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: --low-memory does not apply to --distributed runs\n"
    );
    let o = flow(&[
        "train",
        "--data",
        "moons",
        "--distributed",
        "nccl",
        "--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(2));
    if !cfg!(feature = "nccl") {
        assert_eq!(
            stderr(&o),
            "error: --distributed nccl: this build has no nccl backend: build it with `--features nccl` (see the README's data-parallel training)\n"
        );
    }
    let o = flow(&[
        "train",
        "--data",
        "moons",
        "--steps",
        "5",
        "--distributed",
        "mpi",
        "--out",
        &out,
    ]);
    if cfg!(feature = "mpi") {
        // A process that no launcher started is a world of one.
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains(", 1 process, "), "{}", stderr(&o));
        return;
    }
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: --distributed mpi: this build has no mpi backend: build it with `--features mpi` (see the README's data-parallel training)\n"
    );
    assert!(!Path::new(&out).exists(), "a refused run wrote its model");
}

#[cfg(feature = "mpi")]
mod mpi {
    use std::{
        io::Read,
        process::{Child, Stdio},
        time::{Duration, Instant},
    };

    use super::*;

    /// `mpirun`, where Open MPI is installed; `None`, with a visible note, where it
    /// is not. CI installs it, and fails rather than skip.
    fn mpirun() -> Option<Command> {
        let found = Command::new("mpirun")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(
                std::env::var_os("CI").is_none(),
                "mpirun not found: CI installs Open MPI (apt-get install openmpi-bin libopenmpi-dev)"
            );
            eprintln!("skipped: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)");
            return None;
        }
        let mut c = Command::new("mpirun");
        // Root may run it in a container; more processes than cores is allowed.
        c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .args(["--oversubscribe", "-np", "2"])
            // One thread a process: a batch in the same two parts as one process's
            // on two threads, so the two compute the same sums in the same order.
            .args(["-x", "RAYON_NUM_THREADS=1"]);
        Some(c)
    }

    /// `flow train --distributed mpi` on two processes.
    fn two(launcher: &mut Command, args: &[&str]) -> Output {
        launcher
            .arg(env!("CARGO_BIN_EXE_flow"))
            .args(["train", "--distributed", "mpi", "--dist-check-every", "25"])
            .args(args)
            .output()
            .expect("run mpirun")
    }

    /// `flow train` alone, on two threads.
    fn one(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_flow"))
            .env("RAYON_NUM_THREADS", "2")
            .arg("train")
            .args(args)
            .output()
            .expect("run flow")
    }

    fn ok(o: &Output) {
        assert!(o.status.success(), "{}", stderr(o));
    }

    /// The per-row log-probs `flow log-prob` writes for `input`.
    fn log_probs(model: &Path, input: &Path) -> Vec<f64> {
        let out = model.with_extension("lp.csv");
        let o = flow(&[
            "log-prob",
            "--model",
            &s(model),
            "--input",
            &s(input),
            "--out",
            &s(&out),
        ]);
        ok(&o);
        let text = std::fs::read_to_string(&out).expect("log-probs");
        text.lines()
            .skip(1)
            .map(|l| {
                l.rsplit(',')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("a number")
            })
            .collect()
    }

    fn largest_gap(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn test_points(d: &Path) -> PathBuf {
        let test = d.join("test.csv");
        ok(&flow(&[
            "data",
            "moons",
            "--n",
            "500",
            "--seed",
            "7",
            "--out",
            &s(&test),
        ]));
        test
    }

    const JOB: [&str; 8] = [
        "--data", "moons", "--batch", "512", "--seed", "1", "--steps", "200",
    ];

    #[test]
    fn two_processes_train_the_model_one_process_trains() {
        let Some(mut launcher) = mpirun() else { return };
        let d = dir("moons");
        let (m1, m2) = (d.join("one.safetensors"), d.join("two.safetensors"));
        let o = two(&mut launcher, &[&JOB[..], &["--out", &s(&m2)]].concat());
        ok(&o);
        let err = stderr(&o);
        // Rank 0 alone reports and saves.
        assert_eq!(err.matches("saved ").count(), 1, "{err}");
        assert!(err.contains(", 2 processes, "), "{err}");
        ok(&one(&[&JOB[..], &["--out", &s(&m1)]].concat()));
        let test = test_points(&d);
        let gap = largest_gap(&log_probs(&m1, &test), &log_probs(&m2, &test));
        assert!(gap <= 1e-4, "log-probs differ by {gap}");
    }

    /// The pids of the processes of the run tagged `tag`, by rank: found by the
    /// variables mpirun gave them.
    fn rank_pid(tag: &str, rank: usize) -> Option<u32> {
        let want_tag = format!("FLOWS_TEST_RUN={tag}");
        let want_rank = format!("OMPI_COMM_WORLD_RANK={rank}");
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            let has = |w: &str| vars.contains(&w.as_bytes());
            (has(&want_tag) && has(&want_rank)).then_some(pid)
        })
    }

    /// Starts a long two-process run tagged `tag`, and waits until it has reported
    /// progress (its metrics file has a line).
    fn start_long_run(
        launcher: &mut Command,
        tag: &str,
        d: &Path,
        extra: &[&str],
    ) -> (Child, PathBuf) {
        let (out, metrics) = (d.join("run.safetensors"), d.join("metrics.jsonl"));
        let child = launcher
            .args(["-x", &format!("FLOWS_TEST_RUN={tag}")])
            .arg(env!("CARGO_BIN_EXE_flow"))
            .args(["train", "--distributed", "mpi"])
            .args(&JOB[..6])
            .args(["--metrics", &s(&metrics), "--out", &s(&out)])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mpirun");
        let start = Instant::now();
        while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() == 0) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the run did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (child, out)
    }

    /// Waits for `child`, killing it and failing past `limit`: the run must end by
    /// itself.
    fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if start.elapsed() > limit {
                // mpirun ends its processes on SIGTERM.
                signal("-TERM", child.id());
                std::thread::sleep(Duration::from_secs(5));
                let _ = child.kill();
                panic!("the run still waits after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status.code(), err)
    }

    fn signal(sig: &str, pid: u32) {
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    #[test]
    fn a_signal_to_one_process_stops_both_with_one_checkpoint_that_resumes() {
        let Some(mut launcher) = mpirun() else { return };
        let d = dir("signal");
        let tag = format!("signal-{}", std::process::id());
        let steps = ["--steps", "3000"];
        let (child, out) = start_long_run(&mut launcher, &tag, &d, &steps);
        signal("-INT", rank_pid(&tag, 1).expect("rank 1"));
        let (code, err) = finish(child, Duration::from_secs(60));
        assert_ne!(code, Some(0), "{err}");
        assert_eq!(err.matches("stopped after step ").count(), 1, "{err}");
        // Continued on two processes to the end, the run is the straight run of one.
        let resumed = d.join("resumed.safetensors");
        let Some(mut launcher) = mpirun() else { return };
        let job = [&JOB[..6], &steps[..]].concat();
        let resume = ["--resume", &s(&out), "--out", &s(&resumed)];
        ok(&two(&mut launcher, &[&job[..], &resume[..]].concat()));
        let straight = d.join("straight.safetensors");
        ok(&one(&[&job[..], &["--out", &s(&straight)]].concat()));
        let test = test_points(&d);
        let gap = largest_gap(&log_probs(&straight, &test), &log_probs(&resumed, &test));
        assert!(gap <= 1e-4, "log-probs differ by {gap}");
    }

    #[test]
    fn a_process_that_hangs_makes_the_other_fail_within_the_timeout() {
        let Some(mut launcher) = mpirun() else { return };
        let d = dir("hang");
        let tag = format!("hang-{}", std::process::id());
        let extra = ["--steps", "100000", "--dist-timeout", "3"];
        let (child, out) = start_long_run(&mut launcher, &tag, &d, &extra);
        signal("-STOP", rank_pid(&tag, 1).expect("rank 1"));
        let (code, err) = finish(child, Duration::from_secs(60));
        assert_ne!(code, Some(0), "{err}");
        assert!(
            err.contains("error: rank 0 of 2: no answer from the other processes within 3 s in an all-reduce (MPI): one of them has died or hangs"),
            "{err}"
        );
        assert!(!out.exists(), "a failed run wrote its model");
    }

    #[test]
    fn a_process_that_dies_ends_the_run() {
        let Some(mut launcher) = mpirun() else { return };
        let d = dir("die");
        let tag = format!("die-{}", std::process::id());
        let extra = ["--steps", "100000"];
        let (child, out) = start_long_run(&mut launcher, &tag, &d, &extra);
        signal("-KILL", rank_pid(&tag, 1).expect("rank 1"));
        let (code, err) = finish(child, Duration::from_secs(60));
        assert_ne!(code, Some(0), "{err}");
        assert!(!out.exists(), "a failed run wrote its model");
    }

    #[test]
    fn a_failure_on_rank_0_mid_run_ends_the_other_at_once() {
        let Some(mut launcher) = mpirun() else { return };
        let d = dir("fail");
        let tag = format!("fail-{}", std::process::id());
        // The others wait far longer than the run may take to end: it must not be
        // their timeout that ends it.
        let extra = [
            "--steps",
            "100000",
            "--checkpoint-every",
            "20",
            "--dist-timeout",
            "600",
        ];
        let (child, out) = start_long_run(&mut launcher, &tag, &d, &extra);
        // Rank 0's next checkpoint has nowhere to go.
        // (A checkpoint written meanwhile adds a file: try again.)
        while d.exists() {
            let _ = std::fs::remove_dir_all(&d);
        }
        let (code, err) = finish(child, Duration::from_secs(60));
        assert_ne!(code, Some(0), "{err}");
        assert_eq!(err.matches("error: ").count(), 1, "{err}");
        assert!(err.contains(&s(&out)), "{err}");
    }

    #[test]
    fn glow_with_actnorm_on_two_processes_scores_as_on_one() {
        let Some(mut launcher) = mpirun() else { return };
        let d = dir("glow");
        let (m1, m2) = (d.join("one.safetensors"), d.join("two.safetensors"));
        let job = [
            "--data",
            "digits",
            "--depth",
            "2",
            "--channels",
            "16",
            "--batch",
            "256",
            "--steps",
            "60",
            "--seed",
            "3",
        ];
        ok(&two(
            &mut launcher,
            &[&job[..], &["--out", &s(&m2)]].concat(),
        ));
        ok(&one(&[&job[..], &["--out", &s(&m1)]].concat()));
        let test = d.join("digits_test.csv");
        ok(&flow(&[
            "data",
            "digits",
            "--split",
            "test",
            "--out",
            &s(&test),
        ]));
        let bits = |m: &Path| -> f64 {
            let o = flow(&["log-prob", "--model", &s(m), "--input", &s(&test)]);
            ok(&o);
            let text = String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o);
            let at = text.find(" bits/dim").expect("bits/dim");
            let number = text[..at].rsplit([' ', '(']).next().expect("a number");
            number.parse().expect("bits/dim")
        };
        let (b1, b2) = (bits(&m1), bits(&m2));
        assert!(
            (b1 - b2).abs() <= 0.01,
            "bits/dim {b1} alone, {b2} on two processes"
        );
    }
}
