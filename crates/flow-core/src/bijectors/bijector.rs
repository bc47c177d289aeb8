use std::sync::Arc;

use candle::{Result, Tensor};

use crate::SharedBatch;

/// An invertible map with a tractable log-determinant.
///
/// `forward` maps **data to latent** (`x -> z`, the normalising direction used by
/// `log_prob`); `inverse` maps latent to data (the generative direction used by
/// sampling). Both return their output together with the log-absolute-determinant of
/// *their own* Jacobian, so `forward(x).1 == -inverse(forward(x).0).1`.
///
/// Shapes: inputs and outputs are `(batch, dim)`, log-dets are `(batch,)`.
///
/// The trait is object safe so that a [`Chain`](super::Chain) can hold boxed layers.
/// Two hooks leave room for layers that need more than `x`:
/// - conditional flows pass a context tensor `(batch, context_dim)` through
///   [`forward_with_context`](Bijector::forward_with_context); layers that ignore context
///   keep the default, which calls `forward`;
/// - layers with a training mode (activation normalisation, batch norm with running
///   statistics) override [`set_training`](Bijector::set_training), and those that
///   then use the batch's statistics say so in
///   [`batch_statistics`](Bijector::batch_statistics).
///
/// Two more describe a layer's tensors to a trainer:
/// - [`buffers`](Bijector::buffers) lists the tensors the layer reads but training must
///   not update (fixed statistics, permutations, signs); every other variable the layer
///   created is trainable;
/// - [`initialize`](Bijector::initialize) is data-dependent initialisation (ActNorm):
///   a trainer calls it once on a fresh model, before the first step, and never on a
///   loaded one.
pub trait Bijector: Send + Sync + std::fmt::Debug {
    /// Data to latent: returns `(z, log|det dz/dx|)`.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)>;

    /// Latent to data: returns `(x, log|det dx/dz|)`.
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)>;

    /// [`forward`](Bijector::forward) given a context `(batch, context_dim)`.
    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let _ = context;
        self.forward(x)
    }

    /// [`inverse`](Bijector::inverse) given a context `(batch, context_dim)`.
    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let _ = context;
        self.inverse(z)
    }

    /// Switches between training and evaluation behaviour. A no-op for layers
    /// without such a distinction.
    fn set_training(&mut self, training: bool) {
        let _ = training;
    }

    /// Whether the layer, in its current mode, computes with statistics of the whole
    /// batch (batch norm while training): then a batch's rows cannot be evaluated in
    /// separate parts without changing the result. False for layers that treat every
    /// row on its own.
    fn batch_statistics(&self) -> bool {
        false
    }

    /// Tells a layer that uses the batch's statistics that each process holds a share
    /// of the batch, and how to sum over the shares (`None`: the batch is whole here).
    /// Layers without batch statistics ignore it; composite layers pass it on.
    fn share_batch(&mut self, shared: Option<Arc<dyn SharedBatch>>) {
        let _ = shared;
    }

    /// The layer's non-trainable tensors, as the layer holds them (the same tensors as
    /// the variables they were created as, so a trainer can tell them apart by id).
    fn buffers(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// Sets parameters from a batch `x` of this layer's inputs (and its context, for a
    /// conditional flow), writing them in place. The default does nothing.
    fn initialize(&self, x: &Tensor, context: Option<&Tensor>) -> Result<()> {
        let _ = (x, context);
        Ok(())
    }
}

impl<B: Bijector + ?Sized> Bijector for Box<B> {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        (**self).forward(x)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        (**self).inverse(z)
    }
    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        (**self).forward_with_context(x, context)
    }
    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        (**self).inverse_with_context(z, context)
    }
    fn set_training(&mut self, training: bool) {
        (**self).set_training(training)
    }
    fn batch_statistics(&self) -> bool {
        (**self).batch_statistics()
    }
    fn share_batch(&mut self, shared: Option<Arc<dyn SharedBatch>>) {
        (**self).share_batch(shared)
    }
    fn buffers(&self) -> Vec<Tensor> {
        (**self).buffers()
    }
    fn initialize(&self, x: &Tensor, context: Option<&Tensor>) -> Result<()> {
        (**self).initialize(x, context)
    }
}
