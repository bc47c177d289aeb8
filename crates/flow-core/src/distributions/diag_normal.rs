use candle::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;
use rand::RngCore;

use super::{Distribution, HALF_LN_2PI};
use crate::sampling::randn;

/// A Gaussian with diagonal covariance, `N(loc, diag(exp(log_scale))²)`.
///
/// Built from a `VarBuilder` it reads `loc` and `log_scale`, both `(dim,)`. They are
/// trainable unless [`frozen`](Self::frozen), which declares them buffers.
#[derive(Debug, Clone)]
pub struct DiagNormal {
    /// `(1, dim)`
    loc: Tensor,
    /// `(1, dim)`
    log_scale: Tensor,
    dim: usize,
    /// `loc` and `log_scale` `(dim,)` as given.
    given: [Tensor; 2],
    /// Whether they are fixed rather than trained.
    frozen: bool,
}

impl DiagNormal {
    /// `loc`, `log_scale`: `(dim,)`.
    pub fn from_tensors(loc: Tensor, log_scale: Tensor) -> Result<Self> {
        if loc.rank() != 1 || loc.dims() != log_scale.dims() {
            bail!(
                "DiagNormal needs loc and log_scale of the same shape (dim,), got {:?} and {:?}",
                loc.dims(),
                log_scale.dims()
            );
        }
        let dim = loc.dim(0)?;
        Ok(Self {
            loc: loc.unsqueeze(0)?,
            log_scale: log_scale.unsqueeze(0)?,
            dim,
            given: [loc, log_scale],
            frozen: false,
        })
    }

    /// Marks `loc` and `log_scale` as fixed: they become the distribution's buffers,
    /// which a trainer leaves alone.
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }

    /// Reads (or creates, initialised to `N(0, I)`) `loc` and `log_scale` under `vb`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let loc = vb.get_with_hints(dim, "loc", candle_nn::init::ZERO)?;
        let log_scale = vb.get_with_hints(dim, "log_scale", candle_nn::init::ZERO)?;
        Self::from_tensors(loc, log_scale)
    }

    /// `(dim,)`
    pub fn loc(&self) -> Result<Tensor> {
        self.loc.squeeze(0)
    }

    /// `(dim,)`
    pub fn log_scale(&self) -> Result<Tensor> {
        self.log_scale.squeeze(0)
    }

    fn dtype(&self) -> DType {
        self.loc.dtype()
    }
}

impl Distribution for DiagNormal {
    fn dim(&self) -> usize {
        self.dim
    }

    fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        // Σ_j [−((x_j − μ_j)/σ_j)²/2 − log σ_j] − d·ln(2π)/2
        let u = x
            .broadcast_sub(&self.loc)?
            .broadcast_mul(&self.log_scale.neg()?.exp()?)?;
        let quad = u
            .sqr()?
            .sum(1)?
            .affine(-0.5, -(self.dim as f64) * HALF_LN_2PI)?;
        quad.broadcast_sub(&self.log_scale.sum_all()?)
    }

    fn sample_with_temperature(
        &self,
        n: usize,
        temperature: f64,
        rng: &mut dyn RngCore,
    ) -> Result<Tensor> {
        let eps = randn(n, self.dim, self.dtype(), self.loc.device(), rng)?;
        eps.affine(temperature, 0.0)?
            .broadcast_mul(&self.log_scale.exp()?)?
            .broadcast_add(&self.loc)
    }

    fn buffers(&self) -> Vec<Tensor> {
        if self.frozen {
            self.given.to_vec()
        } else {
            Vec::new()
        }
    }
}
