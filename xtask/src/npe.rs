//! `cargo xtask npe`: neural posterior estimation on three tasks of the sbibm benchmark
//! (two moons, Gaussian linear uniform, Gaussian mixture; `npe_tasks.rs`), ours against
//! the `sbi` package, scored by C2ST against exact reference posteriors.
//!
//! For each task and simulation budget: `N` simulations (θ, x) from the prior and the
//! simulator, written as CSV (θ columns, then x columns); `flow train --data sims.csv
//! --context-dim D --flow nsf` (plus any flags after `--`), timed as a whole process;
//! for each of the observations (drawn from the prior predictive, seeded), 10 000
//! posterior samples from `flow sample --context x_o` and 10 000 exact reference
//! samples. `benches/sbi_npe.py` trains `sbi`'s NPE with its NSF on the same
//! simulations at its defaults (its training time is its `train()` call alone) and
//! samples the same observations; `benches/c2st.py` (scikit-learn) scores each set of
//! samples against the reference as sbibm defines C2ST. Python is `FLOWS_PYTHON`
//! (needs scikit-learn; `sbi` for the peer, skipped with a note where it is missing).
//! `--seeds 0,1,2` trains both sides at each training seed (sbi's runs cached per seed)
//! and adds the mean over seeds. `--prior-box` gives ours what sbi is given, the prior's
//! box, as `--bounds LOW:HIGH,… --bounds-by rejection` (sbi rejects its samples outside
//! the prior's support the same way). Results go to `target/bench-npe/results.jsonl` (one
//! line per run) and `report.md`.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use rand::{rngs::StdRng, SeedableRng};

use crate::{npe_tasks::Task, python_program, root, Result};

/// Posterior and reference samples per observation (sbibm's number).
const SAMPLES: usize = 10_000;

#[derive(Debug, Clone)]
struct Options {
    tasks: Vec<Task>,
    sims: Vec<usize>,
    observations: usize,
    threads: usize,
    /// Run the `sbi` peer (cached per task and budget unless `rerun_sbi`).
    sbi: bool,
    rerun_sbi: bool,
    /// A name for this configuration of ours in the results (default `defaults`, or
    /// the extra flags).
    label: Option<String>,
    /// Flags passed on to `flow train`.
    extra: Vec<String>,
    /// Give ours the prior's box, held by rejection, as sbi is given its prior.
    prior_box: bool,
    /// Training seeds of both sides: ours `flow train --seed`, sbi's `torch.manual_seed`
    /// (which also draws its validation split).
    seeds: Vec<u64>,
    /// Score both sides by the held-out NLL of the parameters given their simulations
    /// instead of C2ST (no sampling): the quick measure the sweep of defaults uses.
    nll_only: bool,
    /// Where the simulations, models, samples and results go.
    out: PathBuf,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        tasks: Task::ALL.to_vec(),
        sims: vec![1_000, 10_000],
        observations: 3,
        threads: 2,
        sbi: true,
        rerun_sbi: false,
        label: None,
        extra: Vec::new(),
        prior_box: false,
        seeds: vec![0],
        nll_only: false,
        out: root().join("target").join("bench-npe"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("npe: {name} needs a value"))
        };
        match a.as_str() {
            "--tasks" => {
                o.tasks = value("--tasks")?
                    .split(',')
                    .map(|t| Task::from_name(t).ok_or_else(|| format!("npe: no task `{t}`")))
                    .collect::<Result<_>>()?
            }
            "--sims" => {
                o.sims = value("--sims")?
                    .split(',')
                    .map(|n| n.parse().map_err(|_| format!("npe: --sims `{n}`")))
                    .collect::<Result<_>>()?
            }
            "--observations" => {
                o.observations = value("--observations")?
                    .parse()
                    .map_err(|_| "npe: --observations N".to_string())?
            }
            "--threads" => {
                o.threads = value("--threads")?
                    .parse()
                    .map_err(|_| "npe: --threads N".to_string())?
            }
            "--no-sbi" => o.sbi = false,
            "--prior-box" => o.prior_box = true,
            "--nll" => o.nll_only = true,
            "--rerun-sbi" => o.rerun_sbi = true,
            "--label" => o.label = Some(value("--label")?),
            "--seeds" => {
                o.seeds = value("--seeds")?
                    .split(',')
                    .map(|v| v.parse().map_err(|_| format!("npe: --seeds `{v}`")))
                    .collect::<Result<_>>()?
            }
            "--out" => o.out = PathBuf::from(value("--out")?),
            "--" => {
                o.extra = it.by_ref().cloned().collect();
            }
            other => {
                return Err(format!(
                    "npe: unknown argument `{other}`; usage: cargo xtask npe [--tasks a,b] [--sims 1000,10000] [--observations N] [--threads N] [--no-sbi] [--rerun-sbi] [--prior-box] [--nll] [--label NAME] [--seeds 0,1,2] [--out DIR] [-- FLOW TRAIN FLAGS]"
                ))
            }
        }
    }
    if o.prior_box && o.extra.iter().any(|f| f.starts_with("--bounds")) {
        return Err("npe: --prior-box gives the bounds; give no --bounds after --".into());
    }
    if o.extra.iter().any(|f| f == "--seed") {
        return Err(
            "npe: give training seeds as --seeds, for both sides, not as --seed after --".into(),
        );
    }
    Ok(o)
}

fn write_rows(path: &Path, header: &[String], rows: &[Vec<f64>]) -> Result<()> {
    let mut text = header.join(",");
    text.push('\n');
    for r in rows {
        let cells: Vec<String> = r.iter().map(|v| format!("{v}")).collect();
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|j| format!("{prefix}{j}")).collect()
}

/// A seed for `(task, what, k)`: every stream of the benchmark its own.
fn seed(task: Task, what: u64, k: u64) -> u64 {
    let t = Task::ALL.iter().position(|&x| x == task).unwrap_or(0) as u64;
    (t + 1) * 1_000_003 + what * 10_007 + k
}

/// The observations of `task` and their reference samples, in `dir`: `obs{k}.csv`
/// (one row of x) and `ref{k}.csv`. Returns each observation.
fn observations(task: Task, count: usize, dir: &Path) -> Result<Vec<Vec<f64>>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut all = Vec::new();
    for k in 1..=count {
        let rng = &mut StdRng::seed_from_u64(seed(task, 1, k as u64));
        let theta = task.prior(rng);
        let x_o = task.simulate(&theta, rng);
        write_rows(
            &dir.join(format!("obs{k}.csv")),
            &names("x", x_o.len()),
            std::slice::from_ref(&x_o),
        )?;
        let rng = &mut StdRng::seed_from_u64(seed(task, 2, k as u64));
        let reference = task.reference(&x_o, SAMPLES, rng);
        write_rows(
            &dir.join(format!("ref{k}.csv")),
            &names("theta", task.theta_dim()),
            &reference,
        )?;
        all.push(x_o);
    }
    Ok(all)
}

/// `n` simulations of `task` as `sims.csv` in `dir`.
fn simulations(task: Task, n: usize, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let rng = &mut StdRng::seed_from_u64(seed(task, 3, n as u64));
    let rows: Vec<Vec<f64>> = (0..n)
        .map(|_| {
            let theta = task.prior(rng);
            let x = task.simulate(&theta, rng);
            theta.into_iter().chain(x).collect()
        })
        .collect();
    let x_dim = rows[0].len() - task.theta_dim();
    let mut header = names("theta", task.theta_dim());
    header.extend(names("x", x_dim));
    let path = dir.join("sims.csv");
    write_rows(&path, &header, &rows)?;
    Ok(path)
}

/// Runs `cmd`, failing with its stderr; returns (stdout, stderr).
fn run(mut cmd: Command) -> Result<(String, String)> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    if !out.status.success() {
        return Err(format!("{shown} failed: {stderr}"));
    }
    Ok((stdout, stderr))
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// C2ST of each pair (reference, samples) in the first `dim` columns.
fn c2st(dim: usize, pairs: &[(PathBuf, PathBuf)]) -> Result<Vec<f64>> {
    let mut cmd = Command::new(python_program());
    cmd.arg(root().join("benches/c2st.py"))
        .args(["--dim", &dim.to_string()]);
    for (r, t) in pairs {
        cmd.args([s(r), s(t)]);
    }
    let (out, _) = run(cmd)?;
    out.lines()
        .map(|l| {
            l.trim()
                .parse()
                .map_err(|_| format!("c2st.py printed `{l}`"))
        })
        .collect()
}

/// One run's outcome.
struct Outcome {
    c2st: Vec<f64>,
    secs: f64,
    /// How training ended (steps or epochs).
    detail: String,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Simulations of `task` that no model trains on: `TEST_SIMS` rows as `test.csv`.
const TEST_SIMS: usize = 2_000;

/// Simulations of `task` that no model trains on, `TEST_SIMS` rows as `test.csv` in
/// `dir`: where both sides' held-out NLL is scored.
fn test_set(task: Task, dir: &Path) -> Result<PathBuf> {
    let rng = &mut StdRng::seed_from_u64(seed(task, 4, 0));
    let rows: Vec<Vec<f64>> = (0..TEST_SIMS)
        .map(|_| {
            let theta = task.prior(rng);
            let x = task.simulate(&theta, rng);
            theta.into_iter().chain(x).collect()
        })
        .collect();
    let x_dim = rows[0].len() - task.theta_dim();
    let mut header = names("theta", task.theta_dim());
    header.extend(names("x", x_dim));
    let test = dir.join("test.csv");
    write_rows(&test, &header, &rows)?;
    Ok(test)
}

/// The held-out NLL, −E log q(θ | x) in nats, of `model` on [`test_set`].
fn held_out_nll(o: &Options, task: Task, model: &Path, dir: &Path) -> Result<f64> {
    let test = test_set(task, dir)?;
    let mut cmd = Command::new(o.out.join("flow"));
    cmd.env("RAYON_NUM_THREADS", o.threads.to_string()).args([
        "log-prob",
        "--model",
        &s(model),
        "--input",
        &s(&test),
    ]);
    let (out, _) = run(cmd)?;
    out.split("NLL ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("flow log-prob printed `{out}`"))
}

/// Our side: train through the binary with training seed `seed`, sample each
/// observation.
fn ours(
    o: &Options,
    task: Task,
    seed: u64,
    sims: &Path,
    obs: &[Vec<f64>],
    obs_dir: &Path,
    dir: &Path,
) -> Result<Outcome> {
    let binary = o.out.join("flow");
    let model = dir.join("ours.safetensors");
    let x_dim = obs[0].len();
    let mut cmd = Command::new(&binary);
    cmd.env("RAYON_NUM_THREADS", o.threads.to_string())
        .args(["train", "--data", &s(sims), "--context-dim"])
        .arg(x_dim.to_string())
        .args(["--flow", "nsf", "--out", &s(&model)])
        .args(["--seed", &seed.to_string()])
        .args(&o.extra);
    if o.prior_box {
        let (low, high) = task.prior_box();
        let bounds = vec![format!("{low}:{high}"); task.theta_dim()].join(",");
        cmd.args(["--bounds", &bounds, "--bounds-by", "rejection"]);
    }
    let started = Instant::now();
    let (_, log) = run(cmd)?;
    let secs = started.elapsed().as_secs_f64();
    let mut detail = log
        .lines()
        .find_map(|l| l.strip_prefix("stopped: "))
        .unwrap_or("")
        .to_string();
    // Which network a run that trained two kept.
    if let Some(kept) = log.lines().find_map(|l| l.strip_prefix("kept ")) {
        let label = kept.split(':').next().unwrap_or(kept);
        detail.push_str(&format!("; kept {label}"));
    }
    if o.nll_only {
        return Ok(Outcome {
            c2st: vec![held_out_nll(o, task, &model, dir)?],
            secs,
            detail,
        });
    }
    let mut pairs = Vec::new();
    for (k, x_o) in obs.iter().enumerate() {
        let context: Vec<String> = x_o.iter().map(|v| format!("{v}")).collect();
        let out = dir.join(format!("ours{}.csv", k + 1));
        let mut cmd = Command::new(&binary);
        cmd.env("RAYON_NUM_THREADS", o.threads.to_string())
            .args(["sample", "--model", &s(&model), "--n"])
            .arg(SAMPLES.to_string())
            .args([
                "--seed",
                &(k + 1).to_string(),
                "--context",
                &context.join(","),
            ])
            .args(["--out", &s(&out)]);
        run(cmd)?;
        pairs.push((obs_dir.join(format!("ref{}.csv", k + 1)), out));
    }
    Ok(Outcome {
        c2st: c2st(task.theta_dim(), &pairs)?,
        secs,
        detail,
    })
}

/// The `sbi` side with training seed `seed`, cached in `dir/sbi.json` (seed 0) or
/// `dir/sbi-seed{seed}/sbi.json` unless asked to rerun: scored by C2ST, or with `--nll`
/// by its held-out NLL on [`test_set`].
fn sbi(
    o: &Options,
    task: Task,
    seed: u64,
    sims: &Path,
    obs: usize,
    obs_dir: &Path,
    budget_dir: &Path,
) -> Result<Outcome> {
    let dir = match seed {
        0 => budget_dir.to_path_buf(),
        s => budget_dir.join(format!("sbi-seed{s}")),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cache = dir.join("sbi.json");
    let outs: Vec<PathBuf> = (1..=obs).map(|k| dir.join(format!("sbi{k}.csv"))).collect();
    let cached = std::fs::read_to_string(&cache).ok().filter(|j| {
        !o.rerun_sbi
            && outs.iter().all(|p| p.exists())
            && crate::json_number(j, "test_nll").is_some()
    });
    let json = match cached {
        Some(j) => j,
        None => {
            let (lo, hi) = task.prior_box();
            let test = test_set(task, budget_dir)?;
            let mut cmd = Command::new(python_program());
            cmd.arg(root().join("benches/sbi_npe.py"))
                .args(["--sims", &s(sims)])
                .args(["--theta-dim", &task.theta_dim().to_string()])
                .args(["--low", &lo.to_string(), "--high", &hi.to_string()])
                .args(["--threads", &o.threads.to_string()])
                .args(["--seed", &seed.to_string()])
                .args(["--test", &s(&test)])
                .arg("--observations")
                .args((1..=obs).map(|k| s(&obs_dir.join(format!("obs{k}.csv")))))
                .arg("--out")
                .args(outs.iter().map(|p| s(p)));
            let (out, _) = run(cmd)?;
            let line = out.lines().last().unwrap_or("").to_string();
            std::fs::write(&cache, &line).map_err(|e| e.to_string())?;
            // New samples: their scores are yet to be computed.
            let _ = std::fs::remove_file(dir.join(SBI_SCORES));
            line
        }
    };
    let secs = crate::json_number(&json, "train_secs").unwrap_or(f64::NAN);
    let epochs = crate::json_number(&json, "epochs").unwrap_or(f64::NAN);
    let detail = format!("{epochs} epochs");
    if o.nll_only {
        let nll = crate::json_number(&json, "test_nll")
            .ok_or_else(|| format!("sbi_npe.py printed no test_nll: `{json}`"))?;
        return Ok(Outcome {
            c2st: vec![nll],
            secs,
            detail,
        });
    }
    // The scores of a cached run are cached beside it: the samples they score are.
    let scores = dir.join(SBI_SCORES);
    let cached_scores = std::fs::read_to_string(&scores)
        .ok()
        .filter(|_| !o.rerun_sbi)
        .and_then(|t| {
            t.split_whitespace()
                .map(|v| v.parse().ok())
                .collect::<Option<Vec<f64>>>()
        })
        .filter(|v| v.len() == obs);
    let c2st = match cached_scores {
        Some(v) => v,
        None => {
            let pairs: Vec<(PathBuf, PathBuf)> = outs
                .iter()
                .enumerate()
                .map(|(k, p)| (obs_dir.join(format!("ref{}.csv", k + 1)), p.clone()))
                .collect();
            let v = c2st(task.theta_dim(), &pairs)?;
            let text: Vec<String> = v.iter().map(|c| c.to_string()).collect();
            std::fs::write(&scores, text.join(" ")).map_err(|e| e.to_string())?;
            v
        }
    };
    Ok(Outcome { c2st, secs, detail })
}

/// The file beside a cached `sbi` run that holds its samples' C2STs.
const SBI_SCORES: &str = "sbi-c2st.txt";

/// Whether the Python interpreter can import `module`.
fn python_has(module: &str) -> bool {
    Command::new(python_program())
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn command(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    if !o.nll_only && !python_has("sklearn") {
        return Err(format!(
            "npe: C2ST needs scikit-learn in {} (set FLOWS_PYTHON)",
            python_program()
        ));
    }
    let with_sbi = o.sbi && python_has("sbi");
    if o.sbi && !with_sbi {
        eprintln!(
            "npe: the sbi package is not importable by {}: the peer is skipped",
            python_program()
        );
    }
    let mut build = crate::cargo();
    build.args(["build", "--release", "-p", "flow-cli"]);
    crate::run(build)?;
    let out = o.out.clone();
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    // A copy of the binary: a build during a long run does not change what it runs.
    std::fs::copy(root().join("target/release/flow"), out.join("flow"))
        .map_err(|e| format!("cannot copy the flow binary: {e}"))?;
    let label = o.label.clone().unwrap_or_else(|| {
        let mut flags = o.extra.clone();
        if o.prior_box {
            flags.insert(0, "prior box".into());
        }
        if flags.is_empty() {
            "defaults".into()
        } else {
            flags.join(" ")
        }
    });
    let (score, peer_score, key) = if o.nll_only {
        ("held-out NLL", "held-out NLL", "nll")
    } else {
        ("C2ST per observation (mean)", "C2ST (mean)", "c2st")
    };
    let mut report = format!(
        "| task | simulations | seed | ours: {score} | ours: train s | sbi NSF: {peer_score} | sbi: train s | ours − sbi |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut results = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("results.jsonl"))
        .map_err(|e| e.to_string())?;
    let show = |v: &[f64]| {
        let each: Vec<String> = v.iter().map(|c| format!("{c:.3}")).collect();
        format!("{} ({:.3})", each.join(", "), mean(v))
    };
    for &task in &o.tasks {
        let obs_dir = out.join(task.name());
        let obs = observations(task, if o.nll_only { 1 } else { o.observations }, &obs_dir)?;
        for &n in &o.sims {
            let dir = obs_dir.join(format!("{n}"));
            let sims = simulations(task, n, &dir)?;
            // Each seed's mean score, ours and the peer's, for the mean over seeds.
            let mut means: Vec<(f64, Option<f64>)> = Vec::new();
            for &seed in &o.seeds {
                let ours = ours(&o, task, seed, &sims, &obs, &obs_dir, &dir)?;
                let peer = if with_sbi {
                    Some(sbi(&o, task, seed, &sims, obs.len(), &obs_dir, &dir)?)
                } else {
                    None
                };
                let (peer_c2st, peer_secs, gap) = match &peer {
                    Some(p) => (
                        show(&p.c2st),
                        format!("{:.1}", p.secs),
                        format!("{:+.3}", mean(&ours.c2st) - mean(&p.c2st)),
                    ),
                    None => ("–".into(), "–".into(), "–".into()),
                };
                let line = format!(
                    "| {} | {n} | {seed} | {} | {:.1} | {peer_c2st} | {peer_secs} | {gap} |",
                    task.name(),
                    show(&ours.c2st),
                    ours.secs
                );
                println!("{label}: {line}  [{}]", ours.detail);
                let _ = writeln!(report, "{line}");
                let peer_json = peer.as_ref().map_or("null".to_string(), |p| {
                    format!(
                        "{{\"{key}\": {:?}, \"secs\": {}, \"detail\": \"{}\"}}",
                        p.c2st, p.secs, p.detail
                    )
                });
                let _ = writeln!(
                    results,
                    "{{\"label\": \"{label}\", \"task\": \"{}\", \"sims\": {n}, \"seed\": {seed}, \"ours\": {{\"{}\": {:?}, \"secs\": {}, \"detail\": \"{}\"}}, \"sbi\": {peer_json}}}",
                    task.name(),
                    key,
                    ours.c2st,
                    ours.secs,
                    ours.detail.replace('"', "'")
                );
                means.push((mean(&ours.c2st), peer.map(|p| mean(&p.c2st))));
            }
            if means.len() > 1 {
                let ours: Vec<f64> = means.iter().map(|m| m.0).collect();
                let peer: Option<Vec<f64>> = means.iter().map(|m| m.1).collect();
                let (peer_mean, gap) = match &peer {
                    Some(p) => (
                        format!("{:.3}", mean(p)),
                        format!("{:+.3}", mean(&ours) - mean(p)),
                    ),
                    None => ("–".into(), "–".into()),
                };
                let line = format!(
                    "| {} | {n} | mean | {:.3} | | {peer_mean} | | {gap} |",
                    task.name(),
                    mean(&ours)
                );
                println!("{label}: {line}");
                let _ = writeln!(report, "{line}");
            }
        }
    }
    let path = out.join("report.md");
    std::fs::write(&path, &report).map_err(|e| e.to_string())?;
    println!("{report}\nwrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn seeds_are_read_for_both_sides_and_a_training_seed_after_the_flags_is_refused() {
        assert_eq!(parse(&args(&[])).expect("defaults").seeds, vec![0]);
        let o = parse(&args(&["--seeds", "0,1,2", "--", "--hidden", "32"])).expect("seeds");
        assert_eq!(o.seeds, vec![0, 1, 2]);
        assert_eq!(o.extra, args(&["--hidden", "32"]));
        assert_eq!(
            parse(&args(&["--seeds", "1,x"])).unwrap_err(),
            "npe: --seeds `x`"
        );
        assert!(parse(&args(&["--", "--seed", "3"]))
            .unwrap_err()
            .contains("--seeds"));
        assert!(parse(&args(&["--prior-box"])).expect("prior box").prior_box);
        assert_eq!(
            parse(&args(&["--prior-box", "--", "--bounds", "0:1"])).unwrap_err(),
            "npe: --prior-box gives the bounds; give no --bounds after --"
        );
    }
}
