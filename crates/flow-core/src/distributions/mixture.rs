use candle::{bail, DType, Result, Tensor, D};
use candle_nn::VarBuilder;
use rand::{Rng, RngCore};

use super::{Distribution, HALF_LN_2PI};
use crate::sampling::randn;

/// A mixture of `K` Gaussians with diagonal covariances:
/// `p(x) = Σ_k w_k N(x; μ_k, diag(σ_k)²)`, `w = softmax(logits)`.
///
/// Built from a `VarBuilder` it reads (or creates) `logits` `(K,)`, `loc` `(K, dim)`
/// and `log_scale` `(K, dim)`; new components start at standard-normal draws for their
/// means (so they spread out), unit scales and equal weights.
#[derive(Debug, Clone)]
pub struct GaussianMixture {
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    dim: usize,
}

impl GaussianMixture {
    pub fn new(components: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        if components == 0 {
            bail!("a mixture needs at least one component");
        }
        let logits = vb.get_with_hints(components, "logits", candle_nn::init::ZERO)?;
        let loc = vb.get_with_hints(
            (components, dim),
            "loc",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let log_scale = vb.get_with_hints((components, dim), "log_scale", candle_nn::init::ZERO)?;
        Ok(Self {
            logits,
            loc,
            log_scale,
            dim,
        })
    }

    pub fn components(&self) -> usize {
        self.logits.dims()[0]
    }

    /// `log w` `(K,)`.
    fn log_weights(&self) -> Result<Tensor> {
        let m = self.logits.max_keepdim(0)?;
        let shifted = self.logits.broadcast_sub(&m)?;
        shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(0)?.log()?)
    }
}

impl Distribution for GaussianMixture {
    fn dim(&self) -> usize {
        self.dim
    }

    fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        // (batch, K): log w_k + log N(x; μ_k, σ_k), then log-sum-exp over k.
        let u = x
            .unsqueeze(1)?
            .broadcast_sub(&self.loc.unsqueeze(0)?)?
            .broadcast_mul(&self.log_scale.neg()?.exp()?.unsqueeze(0)?)?;
        let per = u
            .sqr()?
            .sum(D::Minus1)?
            .affine(-0.5, -(self.dim as f64) * HALF_LN_2PI)?
            .broadcast_sub(&self.log_scale.sum(D::Minus1)?.unsqueeze(0)?)?
            .broadcast_add(&self.log_weights()?.unsqueeze(0)?)?;
        let m = per.max_keepdim(1)?.detach();
        let sum = per.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()?;
        (sum + m)?.squeeze(1)
    }

    fn sample_with_temperature(
        &self,
        n: usize,
        temperature: f64,
        rng: &mut dyn RngCore,
    ) -> Result<Tensor> {
        // Components drawn on the host, like the noise, so a seed gives the same
        // samples on every device.
        let weights = self
            .log_weights()?
            .exp()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let picks: Vec<u32> = (0..n)
            .map(|_| {
                let u: f64 = rng.random();
                let mut acc = 0.0;
                let last = weights.len().saturating_sub(1);
                weights
                    .iter()
                    .position(|w| {
                        acc += w;
                        u < acc
                    })
                    .unwrap_or(last) as u32
            })
            .collect();
        let device = self.loc.device();
        let picks = Tensor::from_vec(picks, n, device)?;
        let eps = randn(n, self.dim, self.loc.dtype(), device, rng)?;
        let scale = self.log_scale.exp()?.index_select(&picks, 0)?;
        let loc = self.loc.index_select(&picks, 0)?;
        (eps.affine(temperature, 0.0)? * scale)? + loc
    }
}
