use candle::{bail, Result, Tensor};

use super::Bijector;

/// A conditional bijector whose context is standardised, `(c − mean) / std` per
/// context feature, before the bijector inside reads it.
///
/// The map of the data is the inner bijector's, so its log-determinant is too: the
/// context is a condition, not a variable of the density. Conditioner networks train
/// poorly on contexts of very different scales (a simulator's outputs, say); with the
/// statistics stored in the model every caller passes the context in its own units.
#[derive(Debug)]
pub struct ContextStandardize {
    inner: Box<dyn Bijector>,
    /// `(1, context_dim)`
    mean: Tensor,
    /// `(1, context_dim)`
    std: Tensor,
    /// The `(context_dim,)` tensors it was built from: its buffers.
    given: [Tensor; 2],
}

impl ContextStandardize {
    /// `mean` and `std` are `(context_dim,)`; every `std` must be positive and finite.
    pub fn new(inner: Box<dyn Bijector>, mean: &Tensor, std: &Tensor) -> Result<Self> {
        let stds = std.to_dtype(candle::DType::F64)?.to_vec1::<f64>()?;
        if stds.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail!(
                "context standardisation needs positive finite standard deviations, got {stds:?}"
            );
        }
        if mean.dims() != std.dims() {
            bail!(
                "context mean {:?} and std {:?} differ in shape",
                mean.dims(),
                std.dims()
            );
        }
        Ok(Self {
            inner,
            mean: mean.unsqueeze(0)?,
            std: std.unsqueeze(0)?,
            given: [mean.clone(), std.clone()],
        })
    }

    /// The bijector that reads the standardised context.
    pub fn inner(&self) -> &dyn Bijector {
        self.inner.as_ref()
    }

    /// `(context_dim,)`
    pub fn mean(&self) -> Result<Tensor> {
        self.mean.squeeze(0)
    }

    /// `(context_dim,)`
    pub fn std(&self) -> Result<Tensor> {
        self.std.squeeze(0)
    }

    /// The context in standardised units.
    pub fn standardize(&self, context: &Tensor) -> Result<Tensor> {
        match context.dims() {
            [_, c] if *c == self.mean.dim(1)? => context
                .broadcast_sub(&self.mean.to_dtype(context.dtype())?)?
                .broadcast_div(&self.std.to_dtype(context.dtype())?),
            dims => bail!(
                "a context of shape {dims:?}, the model takes {} context features",
                self.mean.dim(1)?
            ),
        }
    }
}

impl Bijector for ContextStandardize {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inner.forward(x)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inner.inverse(z)
    }
    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inner
            .forward_with_context(x, &self.standardize(context)?)
    }
    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inner
            .inverse_with_context(z, &self.standardize(context)?)
    }
    fn set_training(&mut self, training: bool) {
        self.inner.set_training(training)
    }
    fn batch_statistics(&self) -> bool {
        self.inner.batch_statistics()
    }
    /// The statistics are fixed: set from the training data's context, never trained.
    fn buffers(&self) -> Vec<Tensor> {
        let mut b = self.inner.buffers();
        b.extend(self.given.iter().cloned());
        b
    }
    fn inner_with_context(
        &self,
        context: Option<&Tensor>,
    ) -> Result<Option<(&dyn Bijector, Option<Tensor>)>> {
        let context = context.map(|c| self.standardize(c)).transpose()?;
        Ok(Some((self.inner.as_ref(), context)))
    }
    fn initialize(&self, x: &Tensor, context: Option<&Tensor>) -> Result<()> {
        let context = context.map(|c| self.standardize(c)).transpose()?;
        self.inner.initialize(x, context.as_ref())
    }
}
