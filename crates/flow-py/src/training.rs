//! `Flow.fit`: a run of `flow_train` on numpy rows, with the GIL released while it
//! trains. Ctrl-C stops it at a safe point: training runs on the thread that called
//! `fit`, which every so often takes the GIL back for an instant to let Python run
//! its signal handlers; a `KeyboardInterrupt` then asks the trainer to stop after the
//! current step, which keeps the weights that step made.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use flow_train::{
    data::{held_out_rows, Dataset},
    format_report,
    recipe::{fit_conditional_run, run_config, Given, OptimizerChoice, RunOptions, ScheduleChoice},
    fit_best_of, val_every_for, Candidate, Control, Report, Reporter, TrainConfig, TrainSummary,
    Trainer,
};
use pyo3::{
    exceptions::PyKeyboardInterrupt,
    prelude::*,
    types::{PyAny, PyDict, PyTuple},
};

use crate::{
    arrays::Rows,
    errors::{value_error, Fail},
    model::{context_rows, json_value, whole, Fitted, Flow, Saved},
};

/// How often training looks for a signal: often enough for Ctrl-C to feel immediate,
/// seldom enough to cost nothing.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// Progress lines a run prints with `progress=True`, besides validation scores.
const PROGRESS_LINES: usize = 10;

/// The run options given as keywords beyond `fit`'s own arguments.
pub fn run_options(options: Option<&Bound<'_, PyDict>>) -> PyResult<RunOptions> {
    let mut o = RunOptions::default();
    let Some(options) = options else {
        return Ok(o);
    };
    for (key, value) in options.iter() {
        let key: String = key.extract()?;
        let choice = |values: &[&'static str]| -> PyResult<String> {
            let text: String = value.extract()?;
            if values.contains(&text.as_str()) {
                Ok(text)
            } else {
                Err(value_error(format!(
                    "invalid value '{text}' for '--{}' [possible values: {}]",
                    key.replace('_', "-"),
                    values.join(", ")
                )))
            }
        };
        match key.as_str() {
            "epochs" => o.epochs = Some(whole("epochs", value.extract()?)?),
            "weight_decay" => o.weight_decay = Some(value.extract()?),
            "lr_decay" => o.lr_decay = Some(value.extract()?),
            "warmup" => o.warmup = Some(whole("warmup", value.extract()?)?),
            "clip_grad" => o.clip_grad = Some(value.extract()?),
            "val_every" => o.val_every = Some(whole("val_every", value.extract()?)?),
            "patience" => o.patience = Some(whole("patience", value.extract()?)?),
            "val_fraction" => o.val_fraction = Some(value.extract()?),
            "optimizer" => {
                let names = OptimizerChoice::ALL.map(OptimizerChoice::name);
                let name = choice(&names)?;
                o.optimizer = OptimizerChoice::ALL.into_iter().find(|c| c.name() == name);
            }
            "schedule" => {
                let names = ScheduleChoice::ALL.map(ScheduleChoice::name);
                let name = choice(&names)?;
                o.schedule = ScheduleChoice::ALL.into_iter().find(|c| c.name() == name);
            }
            other => {
                return Err(value_error(format!(
                    "unknown option `{other}`: fit takes steps, batch, lr, seed, validation, progress, epochs, optimizer, weight_decay, schedule, lr_decay, warmup, clip_grad, val_every, patience and val_fraction"
                )))
            }
        }
    }
    Ok(o)
}

/// Rows (and their context) as the trainer takes them, named `what` in errors.
fn dataset(
    x: &Bound<'_, PyAny>,
    context: Option<&Bound<'_, PyAny>>,
    flow: &Flow,
    what: &str,
) -> PyResult<Dataset> {
    let x = Rows::read(x, flow.config.dim, what)?;
    let c = context_rows(context, flow.config.context_dim, x.rows)?;
    let mut data = Dataset::new(x.cols, x.values);
    if let Some(c) = c {
        data.context_dim = c.cols;
        data.context = if c.rows == x.rows {
            c.values
        } else {
            c.values.repeat(x.rows)
        };
    }
    Ok(data)
}

/// Reports progress on Python's `sys.stderr` and looks for signals.
struct PyReporter<'a> {
    progress: bool,
    every: usize,
    stop: &'a AtomicBool,
    last_check: Instant,
    /// The exception a signal handler raised, if one did.
    raised: Option<PyErr>,
}

impl PyReporter<'_> {
    fn print(&self, line: &str) {
        if !self.progress {
            return;
        }
        Python::attach(|py| {
            let printed = py.import("sys").and_then(|sys| {
                let err = sys.getattr("stderr")?;
                err.call_method1("write", (format!("{line}\n"),))?;
                err.call_method0("flush")
            });
            // Progress that cannot be shown is no reason to stop training.
            drop(printed);
        });
    }

    fn check_signals(&mut self) {
        if self.last_check.elapsed() < SIGNAL_CHECK || self.raised.is_some() {
            return;
        }
        self.last_check = Instant::now();
        if let Err(e) = Python::attach(|py| py.check_signals()) {
            self.stop.store(true, Ordering::SeqCst);
            self.raised = Some(e);
        }
    }
}

impl Reporter for PyReporter<'_> {
    fn start(&mut self, total_steps: usize) {
        self.every = total_steps.div_ceil(PROGRESS_LINES).max(1);
    }

    fn report(&mut self, r: &Report) {
        let due = r.step.is_multiple_of(self.every) || r.step == r.total_steps;
        if due || r.val_nll.is_some() {
            self.print(&format_report(r));
        }
        self.check_signals();
    }

    fn message(&mut self, message: &str) {
        self.print(message);
    }
}

/// Trains `flow` afresh on `x` and stores the result in it; returns the summary.
pub fn fit(
    flow: &mut Flow,
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    context: Option<&Bound<'_, PyAny>>,
    validation: Option<&Bound<'_, PyAny>>,
    run: RunOptions,
    progress: bool,
) -> PyResult<Py<PyAny>> {
    let train = dataset(x, context, flow, "x")?;
    let val = match validation.filter(|v| !v.is_none()) {
        None => None,
        Some(v) => Some(match v.cast::<PyTuple>() {
            Ok(pair) if pair.len() == 2 => dataset(
                &pair.get_item(0)?,
                Some(&pair.get_item(1)?),
                flow,
                "validation",
            )?,
            _ => dataset(v, None, flow, "validation")?,
        }),
    };
    // A model with a rival trains both where there is a validation set, and keeps the
    // better; without one, its own network alone.
    let own = flow.candidates.first().map_or(&flow.config, |(_, model)| model);
    let mut cfg = run_config(
        own.clone(),
        flow.family.as_ref(),
        &run,
        val.is_some(),
    )
    .map_err(value_error)?;
    // Every step reports, so that a signal is noticed within a step.
    cfg.report_every = 1;
    let rows = match &val {
        Some(_) => train.len(),
        None => train.len() - held_out_rows(train.len(), cfg.val_fraction),
    };
    fit_conditional_run(
        &mut cfg,
        rows,
        flow.family.as_ref(),
        Given {
            length: run.steps.is_some() || run.epochs.is_some(),
            schedule: run.schedule.is_some() || run.lr_decay.is_some() || run.warmup.is_some(),
            lr: run.lr.is_some(),
            batch: run.batch.is_some(),
        },
    );
    if run.val_every.is_none() {
        cfg.val_every = val_every_for(rows, cfg.batch_size);
    }
    let validated = val.is_some() || cfg.val_fraction > 0.0;
    let trainer = Trainer::new(cfg, &candle::Device::Cpu).map_err(|e| Fail::from(e).into_py())?;
    let candidates = match (validated, &flow.candidates[..]) {
        (true, [(label, _), rivals @ ..]) if !rivals.is_empty() => {
            let mut candidates = vec![Candidate::new(label, trainer.clone())];
            for (label, model) in rivals {
                let cfg = TrainConfig {
                    model: model.clone(),
                    ..trainer.config().clone()
                };
                let rival = Trainer::new(cfg, &candle::Device::Cpu)
                    .map_err(|e| Fail::from(e).into_py())?;
                candidates.push(Candidate::new(label, rival));
            }
            candidates
        }
        _ => Vec::new(),
    };
    let warnings = trainer
        .data_warnings(&train, "x")
        .map_err(|e| Fail::from(e).into_py())?;
    for w in warnings {
        let category = py.get_type::<pyo3::exceptions::PyUserWarning>();
        PyErr::warn(
            py,
            &category,
            &std::ffi::CString::new(w).unwrap_or_default(),
            1,
        )?;
    }
    let stop = AtomicBool::new(false);
    let mut reporter = PyReporter {
        progress,
        every: 1,
        stop: &stop,
        last_check: Instant::now(),
        raised: None,
    };
    let trained = py.detach(|| {
        let control = Control {
            stop: Some(&stop),
            ..Control::default()
        };
        match candidates.is_empty() {
            true => trainer.fit_with(&train, val.as_ref(), &mut reporter, control),
            false => fit_best_of(&candidates, &train, val.as_ref(), &mut reporter, control),
        }
    });
    if let Some(e) = reporter.raised.take() {
        // Ctrl-C is how a person stops training: the weights stand and the summary
        // says so. Any other exception a handler raised is the caller's to see.
        if !e.is_instance_of::<PyKeyboardInterrupt>(py) {
            return Err(e);
        }
    }
    let trained = trained.map_err(|e| Fail::from(e).into_py())?;
    let summary: TrainSummary = trained.summary.clone();
    if summary.kept_step == Some(0) {
        let reason = summary.stopped.as_deref().unwrap_or("a non-finite step");
        let reason = reason.split(';').next().unwrap_or(reason);
        return Err(value_error(format!(
            "training failed: {reason}, and no step before it trained finite weights (a lower lr or a clip_grad may help)"
        )));
    }
    let value = serde_json::to_value(&summary).map_err(|e| value_error(e.to_string()))?;
    flow.config = trained.model.clone();
    flow.fitted = Some(Fitted {
        flow: trained.flow,
        saved: Saved::Trained {
            checkpoint: Box::new(trained.checkpoint),
            summary: Box::new(summary),
        },
        from: None,
    });
    json_value(py, &value)
}
