//! The steps of a run that differ when it is one of several data-parallel replicas
//! ([`Replicas`]).

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use candle::{Tensor, Var};
use flow_dist::ReplicaSum;

use super::{lock, Run};
use crate::{
    batch_parts,
    gradient::{share_nll_and_gradients, Share},
    nll_and_gradients, Replicas, TrainError,
};

/// A batch's loss and, when it is finite, its gradients.
type Gradients = (f64, Option<Vec<Option<Tensor>>>);

impl Run<'_> {
    /// Makes the run one of `replicas`: it takes rank 0's weights and buffers, its
    /// layers with batch statistics sum them over the shares, and it splits only its
    /// share of a batch across its threads.
    pub(super) fn attach(&mut self, replicas: Replicas) -> Result<(), TrainError> {
        if self.layerwise.is_some() {
            return Err(TrainError::InvalidConfig(
                "low-memory training does not run on several processes yet".into(),
            ));
        }
        if replicas.world() > self.batch {
            return Err(TrainError::InvalidConfig(format!(
                "a batch of {} rows cannot be shared out between {} processes",
                self.batch,
                replicas.world()
            )));
        }
        if replicas.world() > 1 {
            let vars = self.every_variable()?;
            let values: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            for (var, value) in vars.iter().zip(replicas.lead_values(&values)?) {
                var.set(&value)?;
            }
            self.last_good = super::snapshot(&self.model.vars)?;
            let shared = ReplicaSum(replicas.collective().clone());
            self.model.flow.share_batch(Some(Arc::new(shared)));
            let (_, share) = replicas.share(self.batch);
            self.parts = batch_parts(share, &self.model.flow, &self.trainer.device);
        }
        self.replicas = Some(replicas);
        self.check_replicas()
    }

    /// The model's variables, trainable or buffers, in the order of their names.
    fn every_variable(&self) -> Result<Vec<Var>, TrainError> {
        let map = lock(&self.model.varmap)?;
        let mut named: Vec<(&String, &Var)> = map.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        Ok(named.into_iter().map(|(_, v)| v.clone()).collect())
    }

    /// Whether to stop before the next step. With replicas, all stop when a stop was
    /// asked of any (its flag is then set on every one, as if each had been asked).
    pub(super) fn agree_to_stop(&self, stop: Option<&AtomicBool>) -> Result<bool, TrainError> {
        let asked = stop.is_some_and(|s| s.load(Ordering::SeqCst));
        let Some(r) = &self.replicas else {
            return Ok(asked);
        };
        let askers = r.sum_values(&[f64::from(u8::from(asked))], &self.trainer.device)?[0];
        if askers > 0.0 {
            if let Some(s) = stop {
                s.store(true, Ordering::SeqCst);
            }
        }
        Ok(askers > 0.0)
    }

    /// A validation score every replica holds alike: with replicas, their mean. Each
    /// scores the same weights on the same rows, so the scores agree but for the order
    /// of float additions; the mean makes them equal bit for bit, so that the best
    /// weights and an early stop are decided alike by all.
    pub(super) fn agree_on_score(&self, score: f64) -> Result<f64, TrainError> {
        let Some(r) = &self.replicas else {
            return Ok(score);
        };
        let sum = r.sum_values(&[score], &self.trainer.device)?[0];
        Ok(sum / r.world() as f64)
    }

    /// The loss and gradients of the batch `x` (with its context `c`): alone, the
    /// whole batch's; with replicas, this process's share's, summed over them.
    pub(super) fn gradients(
        &mut self,
        x: &Tensor,
        c: Option<&Tensor>,
    ) -> Result<Gradients, TrainError> {
        let (flow, vars) = (&self.model.flow, &self.model.vars);
        let Some(r) = &self.replicas else {
            return Ok(match &mut self.layerwise {
                Some(l) => l.nll_and_gradients(flow, vars, x, c, self.parts)?,
                None => nll_and_gradients(flow, vars, x, c, self.parts)?,
            });
        };
        let rows = x.dim(0)?;
        let (start, len) = r.share(rows);
        let x = x.narrow(0, start, len)?;
        let c = c.map(|c| c.narrow(0, start, len)).transpose()?;
        let share = Share {
            rows,
            always_differentiate: true,
        };
        let (loss, grads) = share_nll_and_gradients(flow, vars, &x, c.as_ref(), self.parts, share)?;
        let loss = r.sum_values(&[loss], &self.trainer.device)?[0];
        // A non-finite sum has a non-finite share in it: every replica stops or skips.
        let (true, Some(grads)) = (loss.is_finite(), grads) else {
            return Ok((loss, None));
        };
        let present: Vec<Tensor> = grads.iter().flatten().cloned().collect();
        let mut summed = r.sum_tensors(&present)?.into_iter();
        let grads = grads
            .into_iter()
            .map(|g| g.and_then(|_| summed.next()))
            .collect();
        Ok((loss, Some(grads)))
    }

    /// At the steps the replicas check at: checks that every replica holds rank 0's
    /// weights and buffers.
    pub(super) fn check_replicas(&self) -> Result<(), TrainError> {
        let Some(r) = &self.replicas else {
            return Ok(());
        };
        let step = self.state.step;
        if r.world() == 1 || !r.checks_at(step) {
            return Ok(());
        }
        let tensors: Vec<Tensor> = self
            .every_variable()?
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        r.check_same(&tensors, step, &self.trainer.device)
    }
}
