//! Choosing between models by validation: several candidates train in step on the
//! same rows, a candidate that trails another's best score and has stopped improving
//! is dropped, and the one with the best validation NLL is returned. A family offers
//! such a contest where no single network of its own is best on every task
//! (BENCHMARKS.md, "the 10-d task at 10³").

use serde::{Deserialize, Serialize};

use super::{Ending, Run, TrainData};
use crate::{data::Dataset, Control, Report, Reporter, TrainError, Trained, Trainer};

/// The validation scores without improvement after which a candidate whose best
/// trails another's is dropped: a third of its patience, rounded up (with none, it is
/// never dropped). On the sbibm tasks of BENCHMARKS.md this keeps the network a full
/// run of each would keep, where three scores dropped the better one early on long
/// runs (the Gaussian mixture at 10⁴ simulations).
fn drop_after(patience: Option<usize>) -> usize {
    patience.map_or(usize::MAX, |p| p.div_ceil(3))
}

/// A model to train in [`fit_best_of`], under a name its messages use.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub label: String,
    pub trainer: Trainer,
}

impl Candidate {
    pub fn new(label: impl Into<String>, trainer: Trainer) -> Self {
        Self {
            label: label.into(),
            trainer,
        }
    }
}

/// A candidate that was not kept, as the summary of the one kept records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rival {
    pub label: String,
    /// Its best validation NLL, nats per sample.
    pub best_val_nll: Option<f64>,
    /// The steps it trained before it stopped or was dropped.
    pub steps: usize,
}

/// Where a candidate stands.
enum Entrant<'a> {
    Running(Box<Run<'a>>),
    Finished(Box<Trained>),
    Dropped(Rival),
}

impl Entrant<'_> {
    fn best(&self) -> Option<f64> {
        match self {
            Self::Running(run) => run.state.best_val_nll,
            Self::Finished(t) => t.summary.best_val_nll,
            Self::Dropped(r) => r.best_val_nll,
        }
    }
}

/// Whether the best score `a` beats the best score `b` (a score beats none).
fn beats(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a < b,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Trains `candidates` in step on `train`, scored on `val` (without one, on the rows
/// the first candidate's settings hold out), and returns the one with the best
/// validation NLL; its summary lists the others as [`Rival`]s.
///
/// The candidates must differ in their model alone: the same run settings, device and
/// dtype, and so the same batches and validation steps. Each trains exactly as it
/// would alone, and one that trails another's best and has gone a third of its
/// patience without improving is dropped. `reporter` follows the first candidate still
/// in training; periodic checkpoints wait until one candidate is left. An interrupted
/// contest returns the candidate whose best leads (the first while none has a score),
/// to be continued alone. A contest starts afresh in one process: `control` may not
/// resume nor hold replicas.
pub fn fit_best_of(
    candidates: &[Candidate],
    train: &Dataset,
    val: Option<&Dataset>,
    reporter: &mut dyn Reporter,
    mut control: Control,
) -> Result<Trained, TrainError> {
    let Some((first, rest)) = candidates.split_first() else {
        return Err(TrainError::InvalidConfig("no model to train".into()));
    };
    if rest.is_empty() {
        return first.trainer.fit_with(train, val, reporter, control);
    }
    let invalid = |msg: &str| Err(TrainError::InvalidConfig(msg.into()));
    if control.resume.is_some() || control.replicas.is_some() {
        return invalid("a choice between models starts afresh, in one process");
    }
    let trainer = &first.trainer;
    for c in rest {
        let t = &c.trainer;
        let settings = crate::TrainConfig {
            model: trainer.cfg.model.clone(),
            ..t.cfg.clone()
        };
        let same_device = t.device.location() == trainer.device.location();
        if settings != trainer.cfg || !same_device || t.dtype != trainer.dtype {
            return invalid("the models chosen between must share their run settings");
        }
        t.check_inputs(train, val)?;
    }
    let (train, held_out) = trainer.checked_split(train, val)?;
    let Some(val) = val.or(held_out.as_ref()) else {
        return invalid("choosing between models needs a validation set");
    };
    let mut entrants = candidates
        .iter()
        .map(|c| {
            let run = Run::start(&c.trainer, TrainData::Held(train.as_ref()), Some(val), None)?;
            Ok(Entrant::Running(Box::new(run)))
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    reporter.start(trainer.total_steps(train.len()));
    let mut stepping = Control {
        skip_nonfinite: control.skip_nonfinite,
        ..Control::default()
    };
    let n_val = val.len();
    loop {
        let running: Vec<usize> = (0..entrants.len())
            .filter(|&i| matches!(entrants[i], Entrant::Running(_)))
            .collect();
        let [lead, ..] = running[..] else { break };
        if running.len() == 1 {
            break;
        }
        let halt = match &entrants[lead] {
            Entrant::Running(run) => run.halt(&control)?,
            _ => None,
        };
        for &i in &running {
            let Entrant::Running(run) = &mut entrants[i] else {
                continue;
            };
            let ending = match &halt {
                Some(h) => Some(Ending {
                    stopped: h.stopped.clone(),
                    interrupted: true,
                    kept_step: None,
                }),
                None if run.state.step >= run.total => Some(Ending::default()),
                None if i == lead => run.advance(&mut Following(reporter), &mut stepping)?,
                None => run.advance(&mut Silent, &mut stepping)?,
            };
            if let Some(end) = ending {
                let Entrant::Running(run) = std::mem::replace(&mut entrants[i], placeholder())
                else {
                    unreachable!("matched as running above");
                };
                entrants[i] = Entrant::Finished(Box::new(run.finish(end, n_val, &mut Silent)?));
            }
        }
        for i in running {
            let Entrant::Running(run) = &entrants[i] else {
                continue;
            };
            let best = run.state.best_val_nll;
            let led = (0..entrants.len()).find(|&j| j != i && beats(entrants[j].best(), best));
            let stalled = run.state.since_best >= drop_after(run.trainer.cfg.patience);
            if let (true, Some(j)) = (stalled, led) {
                let rival = Rival {
                    label: candidates[i].label.clone(),
                    best_val_nll: best,
                    steps: run.state.step,
                };
                reporter.message(&format!(
                    "dropped {} at step {}: its best validation NLL{} trails that of {}",
                    rival.label,
                    rival.steps,
                    best.map_or(String::new(), |b| format!(", {b:.4},")),
                    candidates[j].label
                ));
                entrants[i] = Entrant::Dropped(rival);
            }
        }
    }
    for e in &mut entrants {
        if let Entrant::Running(_) = e {
            let Entrant::Running(run) = std::mem::replace(e, placeholder()) else {
                unreachable!("matched as running above");
            };
            let control = std::mem::take(&mut control);
            *e = Entrant::Finished(Box::new(run.go_on(
                Some(val),
                &mut Following(reporter),
                control,
            )?));
        }
    }
    let mut winner = None;
    for (i, e) in entrants.iter().enumerate() {
        if let Entrant::Finished(t) = e {
            if winner.is_none_or(|w: usize| beats(t.summary.best_val_nll, entrants[w].best())) {
                winner = Some(i);
            }
        }
    }
    let Some(w) = winner else {
        return invalid("every model was dropped");
    };
    let mut rivals = Vec::new();
    let mut kept = None;
    for (i, e) in entrants.into_iter().enumerate() {
        let label = candidates[i].label.clone();
        match e {
            Entrant::Finished(t) if i == w => kept = Some(t),
            Entrant::Finished(t) => rivals.push(Rival {
                label,
                best_val_nll: t.summary.best_val_nll,
                steps: t.summary.steps,
            }),
            Entrant::Dropped(r) => rivals.push(r),
            Entrant::Running(_) => {}
        }
    }
    let Some(mut kept) = kept else {
        return invalid("the model kept was lost");
    };
    if let Some(msg) = &kept.summary.stopped {
        reporter.message(msg);
    }
    let score = |b: Option<f64>| b.map_or("no score".to_string(), |b| format!("{b:.4}"));
    let others: Vec<String> = rivals
        .iter()
        .map(|r| format!("{} for {}", score(r.best_val_nll), r.label))
        .collect();
    reporter.message(&format!(
        "kept {}: best validation NLL {} against {}",
        candidates[w].label,
        score(kept.summary.best_val_nll),
        others.join(", ")
    ));
    kept.summary.rivals = rivals;
    reporter.finish(&kept.summary);
    Ok(*kept)
}

/// What stands in an entrant's place while it is moved out.
fn placeholder() -> Entrant<'static> {
    Entrant::Dropped(Rival {
        label: String::new(),
        best_val_nll: None,
        steps: 0,
    })
}

/// Hears nothing: the candidates that are not followed.
struct Silent;

impl Reporter for Silent {
    fn report(&mut self, _: &Report) {}
}

/// Passes on a candidate's progress but not its ending, which [`fit_best_of`] tells
/// once the choice is made.
struct Following<'r>(&'r mut dyn Reporter);

impl Reporter for Following<'_> {
    fn report(&mut self, report: &Report) {
        self.0.report(report);
    }
}

#[cfg(test)]
mod tests {
    use candle::Device;

    use super::*;
    use crate::{
        data::{generate, Toy},
        Duration, TrainConfig,
    };

    /// A run of `layers` couplings of `hidden` units at a rate of 0.01: 600 steps at
    /// most in batches of 64, scored every 10 on half the rows held out, patience 20.
    fn settings(layers: usize, hidden: usize) -> TrainConfig {
        let model = flow_realnvp::RealNvpConfig::new(2)
            .with_layers(layers)
            .with_hidden(hidden);
        TrainConfig::new(model)
            .with_optimizer(crate::OptimizerConfig {
                lr: 0.01,
                ..crate::OptimizerConfig::default()
            })
            .with_duration(Duration::Steps(600))
            .with_batch_size(64)
            .with_val_every(10)
            .with_patience(Some(20))
            .with_val_fraction(0.5)
    }

    fn candidate(label: &str, cfg: TrainConfig) -> Result<Candidate, TrainError> {
        Ok(Candidate::new(label, Trainer::new(cfg, &Device::Cpu)?))
    }

    fn weights(t: &Trained) -> Result<Vec<(String, Vec<f32>)>, TrainError> {
        let mut all: Vec<(String, Vec<f32>)> = super::super::lock(&t.varmap)?
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
            .collect::<candle::Result<_>>()?;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    #[test]
    fn the_model_kept_validates_best_and_trains_as_it_would_alone() -> Result<(), TrainError> {
        // On 60 training rows six couplings of 128 units overfit within a few dozen
        // steps; two of 8 go on improving for hundreds. Listed overfitting first, so
        // that the choice is not the first candidate by default.
        let data = generate(Toy::Moons, 120, None, 3)?;
        let (weak, strong) = (settings(6, 128), settings(2, 8));
        let candidates = [
            candidate("weak", weak.clone())?,
            candidate("strong", strong.clone())?,
        ];
        let kept = fit_best_of(&candidates, &data, None, &mut Silent, Control::default())?;
        assert_eq!(kept.model, strong.model);
        let alone =
            |cfg: TrainConfig| Trainer::new(cfg, &Device::Cpu)?.fit(&data, None, &mut Silent);
        let (strong_alone, weak_alone) = (alone(strong)?, alone(weak)?);
        // The same steps, scores and weights as the strong model trained alone.
        let (s, a) = (&kept.summary, &strong_alone.summary);
        assert_eq!(
            (s.steps, s.best_step, s.best_val_nll),
            (a.steps, a.best_step, a.best_val_nll)
        );
        assert_eq!(weights(&kept)?, weights(&strong_alone)?);
        // The weak one was dropped before it would have stopped alone, having scored
        // as it did alone, and worse.
        let [rival] = &s.rivals[..] else {
            panic!("rivals {:?}", s.rivals);
        };
        assert_eq!(rival.label, "weak");
        let w = &weak_alone.summary;
        assert!(rival.steps < w.steps, "{rival:?} against {w:?}");
        assert_eq!(rival.best_val_nll, w.best_val_nll);
        assert!(beats(s.best_val_nll, rival.best_val_nll), "{s:?}");
        Ok(())
    }

    #[test]
    fn when_both_reach_the_end_the_better_score_is_kept() -> Result<(), TrainError> {
        let data = generate(Toy::Moons, 120, None, 3)?;
        // 60 steps: neither model stops nor is dropped before the end, and by then the
        // large model, listed second, has the better score (it overfits later).
        let short = |l, h| settings(l, h).with_duration(Duration::Steps(60));
        let (small, large) = (short(2, 8), short(6, 128));
        let alone =
            |cfg: TrainConfig| Trainer::new(cfg, &Device::Cpu)?.fit(&data, None, &mut Silent);
        let (small_alone, large_alone) = (alone(small.clone())?, alone(large.clone())?);
        let (small_best, large_best) = (
            small_alone.summary.best_val_nll,
            large_alone.summary.best_val_nll,
        );
        assert!(
            beats(large_best, small_best),
            "{large_best:?} against {small_best:?}"
        );
        let candidates = [
            candidate("small", small)?,
            candidate("large", large.clone())?,
        ];
        let kept = fit_best_of(&candidates, &data, None, &mut Silent, Control::default())?;
        assert_eq!(kept.model, large.model);
        let s = &kept.summary;
        let [rival] = &s.rivals[..] else {
            panic!("rivals {:?}", s.rivals);
        };
        assert_eq!(
            (rival.label.as_str(), rival.steps, s.steps),
            ("small", 60, 60)
        );
        assert_eq!(
            (s.best_val_nll, rival.best_val_nll),
            (large_best, small_best)
        );
        Ok(())
    }

    #[test]
    fn a_choice_needs_the_same_run_settings_and_a_validation_set() -> Result<(), TrainError> {
        let data = generate(Toy::Moons, 200, None, 3)?;
        let fails = |a: TrainConfig, b: TrainConfig| -> Result<String, TrainError> {
            let candidates = [candidate("a", a)?, candidate("b", b)?];
            Ok(
                fit_best_of(&candidates, &data, None, &mut Silent, Control::default())
                    .map(|t| format!("trained {:?}", t.summary))
                    .unwrap_or_else(|e| e.to_string()),
            )
        };
        let other_seed = settings(1, 4).with_seed(9);
        assert!(fails(settings(1, 2), other_seed)?.contains("must share their run settings"));
        let unvalidated = |l, h| settings(l, h).with_val_fraction(0.0);
        assert!(fails(unvalidated(1, 2), unvalidated(1, 4))?.contains("needs a validation set"));
        Ok(())
    }
}
