//! A built model's distribution as its configuration defines it: the flow's own, or
//! the flow's restricted to bounds held by rejection. Every face of the library draws
//! and scores through here, so that no command forgets the bounds.

use candle::{Result, Tensor};
use flow_core::{Flow, TruncatedLogProb};
use rand::RngCore;

use crate::ModelConfig;

/// Draws and log-densities of a model built from its configuration.
#[derive(Debug)]
pub struct ModelDensity<'a> {
    flow: &'a Flow,
    /// The flow restricted to the bounds held by rejection, if the model has them.
    truncated: Option<TruncatedLogProb<'a>>,
}

impl<'a> ModelDensity<'a> {
    /// The distribution of `flow`, built from `config`.
    pub fn new(config: &'a ModelConfig, flow: &'a Flow) -> Result<Self> {
        let truncated = config
            .truncation()
            .map(|bounds| TruncatedLogProb::new(flow, bounds))
            .transpose()?;
        Ok(Self { flow, truncated })
    }

    /// `log p(x | context)` `(batch,)`, as [`Flow::log_prob_with_context`] takes its
    /// arguments; with bounds held by rejection, normalised by an estimate
    /// ([`TruncatedLogProb`]).
    pub fn log_prob(&mut self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        match &mut self.truncated {
            Some(t) => t.log_prob(x, context),
            None => self.flow.log_prob_with_context(x, context),
        }
    }

    /// `n` samples, as [`Flow::sample_with_context`] takes its arguments; with bounds
    /// held by rejection, every one inside them.
    pub fn sample(
        &self,
        n: usize,
        temperature: f64,
        context: Option<&Tensor>,
        rng: &mut dyn RngCore,
    ) -> Result<Tensor> {
        match &self.truncated {
            Some(t) => t.truncated().sample(n, temperature, context, rng),
            None => self.flow.sample_with_context(n, temperature, context, rng),
        }
    }

    /// With bounds held by rejection, once log-probs have been taken: a line saying
    /// that they were normalised by an estimate, from how many contexts.
    pub fn normalised_note(&self) -> Option<String> {
        let t = self.truncated.as_ref()?;
        Some(format!(
            "log-probs inside the bounds divided by the flow's mass there, estimated from {} draws at each of {} distinct context(s) (smallest mass {:.4})",
            flow_core::truncation::ACCEPTANCE_DRAWS,
            t.contexts(),
            t.smallest_acceptance()?
        ))
    }
}
