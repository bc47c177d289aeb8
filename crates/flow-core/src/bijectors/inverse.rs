use std::sync::Arc;

use candle::{Result, Tensor};

use super::Bijector;
use crate::SharedBatch;

/// Swaps the directions of a bijector: `Inverse(b).forward == b.inverse`.
///
/// Buffers pass through; data-dependent initialisation does not (a layer's is defined
/// on the inputs of its own forward direction, which an inverted layer never sees).
///
/// Useful for layers defined in the generative direction (noise to data), as some
/// libraries do, when they are placed in a data-to-latent chain.
#[derive(Debug)]
pub struct Inverse<B>(pub B);

impl<B: Bijector> Bijector for Inverse<B> {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.0.inverse(x)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.0.forward(z)
    }
    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.0.inverse_with_context(x, context)
    }
    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.0.forward_with_context(z, context)
    }
    fn set_training(&mut self, training: bool) {
        self.0.set_training(training)
    }
    fn batch_statistics(&self) -> bool {
        self.0.batch_statistics()
    }
    fn share_batch(&mut self, shared: Option<Arc<dyn SharedBatch>>) {
        self.0.share_batch(shared)
    }
    fn buffers(&self) -> Vec<Tensor> {
        self.0.buffers()
    }
    /// A layer's recorded passes run its own direction, so an inverted layer with batch
    /// statistics cannot use them.
    fn recomputable(&self) -> bool {
        self.0.recomputable() && !self.0.batch_statistics()
    }
}
