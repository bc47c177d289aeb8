//! A normalizing flow: a bijector from data to latent space plus a base distribution.

use candle::{bail, Result, Tensor};
use rand::RngCore;

use crate::{Bijector, Distribution};

/// A normalizing flow `x = f⁻¹(z)`, `z ~ p_Z`, with exact density
/// `log p(x) = log p_Z(f(x)) + log|det ∂f/∂x|`.
///
/// All data tensors are `(batch, dim)`; log-probs are `(batch,)` in nats.
///
/// ```
/// use candle::{DType, Device, Tensor};
/// use flow_core::{Chain, Flow, Reverse, StandardNormal, Standardize};
/// use rand::{rngs::StdRng, SeedableRng};
///
/// # fn main() -> candle::Result<()> {
/// let device = Device::Cpu;
/// // A fixed flow: standardise with mean (1, 2) and std (2, 0.5), then swap features.
/// let mut chain = Chain::default();
/// chain.push(Standardize::new(
///     &Tensor::new(&[1f32, 2.], &device)?,
///     &Tensor::new(&[2f32, 0.5], &device)?,
/// )?);
/// chain.push(Reverse::new(2, &device)?);
/// let flow = Flow::new(chain, StandardNormal::new(2, DType::F32, &device));
///
/// let x = Tensor::new(&[[1f32, 2.], [3., 2.5]], &device)?;
/// let log_p = flow.log_prob(&x)?; // (2,): here the density of N((1, 2), diag(4, 0.25))
/// assert_eq!(log_p.dims(), &[2]);
///
/// let mut rng = StdRng::seed_from_u64(7);
/// let samples = flow.sample(100, &mut rng)?; // (100, 2)
/// assert_eq!(samples.dims(), &[100, 2]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Flow {
    bijector: Box<dyn Bijector>,
    base: Box<dyn Distribution>,
}

impl Flow {
    pub fn new(bijector: impl Bijector + 'static, base: impl Distribution + 'static) -> Self {
        Self::from_boxed(Box::new(bijector), Box::new(base))
    }

    pub fn from_boxed(bijector: Box<dyn Bijector>, base: Box<dyn Distribution>) -> Self {
        Self { bijector, base }
    }

    pub fn bijector(&self) -> &dyn Bijector {
        self.bijector.as_ref()
    }

    pub fn bijector_mut(&mut self) -> &mut dyn Bijector {
        self.bijector.as_mut()
    }

    pub fn base(&self) -> &dyn Distribution {
        self.base.as_ref()
    }

    /// Number of features.
    pub fn dim(&self) -> usize {
        self.base.dim()
    }

    fn check_input(&self, x: &Tensor, what: &str) -> Result<()> {
        match x.dims() {
            [_, d] if *d == self.dim() => Ok(()),
            [_, d] => bail!("{what} has {d} features but the model has {}", self.dim()),
            dims => bail!("{what} must be (batch, {}), got {dims:?}", self.dim()),
        }
    }

    /// A context for `rows` points: `(rows, c)` as it is, or `(1, c)` repeated.
    fn check_context(context: &Tensor, rows: usize) -> Result<Tensor> {
        match context.dims() {
            [r, _] if *r == rows => Ok(context.clone()),
            [1, c] => context.broadcast_as((rows, *c))?.contiguous(),
            [r, _] => bail!("a context of {r} rows for {rows} points"),
            dims => bail!("a context must be (batch, context features), got {dims:?}"),
        }
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        self.check_input(x, "input")?;
        match context {
            Some(c) => {
                let c = Self::check_context(c, x.dim(0)?)?;
                self.bijector.forward_with_context(x, &c)
            }
            None => self.bijector.forward(x),
        }
    }

    fn inverse(&self, z: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        match context {
            Some(c) => {
                let c = Self::check_context(c, z.dim(0)?)?;
                self.bijector.inverse_with_context(z, &c)
            }
            None => self.bijector.inverse(z),
        }
    }

    /// `log p(x)` `(batch,)` for `x: (batch, dim)`.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        self.log_prob_with_context(x, None)
    }

    /// `log p(x | context)`; the context is `(batch, context features)`, or one row
    /// for every point. `None` is the unconditional [`log_prob`](Self::log_prob).
    pub fn log_prob_with_context(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (z, log_det) = self.forward(x, context)?;
        self.base.log_prob(&z)? + log_det
    }

    /// The latent `f(x)`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        self.encode_with_context(x, None)
    }

    /// The latent `f(x; context)`.
    pub fn encode_with_context(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward(x, context)?.0)
    }

    /// The data point `f⁻¹(z)` of a latent.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_with_context(z, None)
    }

    /// The data point `f⁻¹(z; context)` of a latent.
    pub fn decode_with_context(&self, z: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.check_input(z, "latent")?;
        Ok(self.inverse(z, context)?.0)
    }

    /// `n` samples `(n, dim)`.
    pub fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        self.sample_with_temperature(n, 1.0, rng)
    }

    /// `n` samples `(n, dim)` drawn from the base distribution with its spread scaled
    /// by `temperature` (below 1 concentrates on the modes).
    pub fn sample_with_temperature(
        &self,
        n: usize,
        temperature: f64,
        rng: &mut dyn RngCore,
    ) -> Result<Tensor> {
        self.sample_with_context(n, temperature, None, rng)
    }

    /// `n` samples given a context: `(n, context features)`, one row per sample, or
    /// `(1, context features)` for all of them; with `temperature` as in
    /// [`sample_with_temperature`](Self::sample_with_temperature).
    pub fn sample_with_context(
        &self,
        n: usize,
        temperature: f64,
        context: Option<&Tensor>,
        rng: &mut dyn RngCore,
    ) -> Result<Tensor> {
        if !(temperature.is_finite() && temperature > 0.0) {
            bail!("temperature must be positive, got {temperature}");
        }
        let z = self.base.sample_with_temperature(n, temperature, rng)?;
        Ok(self.inverse(&z, context)?.0)
    }

    /// `n` samples and their log-densities, in one pass.
    pub fn sample_and_log_prob(&self, n: usize, rng: &mut dyn RngCore) -> Result<(Tensor, Tensor)> {
        let z = self.base.sample(n, rng)?;
        let (x, log_det_inverse) = self.bijector.inverse(&z)?;
        let log_p = (self.base.log_prob(&z)? - log_det_inverse)?;
        Ok((x, log_p))
    }

    /// Whether a layer, in its current mode, uses statistics of the whole batch (batch
    /// norm while training), so that a batch's rows cannot be evaluated in parts.
    pub fn batch_statistics(&self) -> bool {
        self.bijector.batch_statistics()
    }

    pub fn set_training(&mut self, training: bool) {
        self.bijector.set_training(training)
    }

    /// Tells the layers that use a batch's statistics that each process holds a share
    /// of every batch, and how to sum over the shares ([`Bijector::share_batch`]);
    /// `None` makes the batch whole again.
    pub fn share_batch(&mut self, shared: Option<std::sync::Arc<dyn crate::SharedBatch>>) {
        self.bijector.share_batch(shared)
    }

    /// The tensors of the bijector and the base that training must leave alone.
    pub fn buffers(&self) -> Vec<Tensor> {
        let mut b = self.bijector.buffers();
        b.extend(self.base.buffers());
        b
    }

    /// Data-dependent initialisation from a batch `x` (and its context): see
    /// [`Bijector::initialize`].
    pub fn initialize(&self, x: &Tensor, context: Option<&Tensor>) -> Result<()> {
        self.check_input(x, "input")?;
        match context {
            Some(c) => self
                .bijector
                .initialize(x, Some(&Self::check_context(c, x.dim(0)?)?)),
            None => self.bijector.initialize(x, None),
        }
    }
}
