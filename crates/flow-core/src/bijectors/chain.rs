use std::sync::Arc;

use candle::{Result, Tensor};

use super::{stages_of, zero_log_det, Bijector, Stage};
use crate::SharedBatch;

/// A composition `f = f_n ∘ … ∘ f_1` of bijectors.
///
/// `forward` applies the layers in list order and `inverse` in reverse order; the
/// log-dets of the layers add up, so for a flow
/// `log p(x) = Σ_i log|det J_i| + log p_Z(f(x))`.
#[derive(Debug, Default)]
pub struct Chain {
    layers: Vec<Box<dyn Bijector>>,
}

impl Chain {
    pub fn new(layers: Vec<Box<dyn Bijector>>) -> Self {
        Self { layers }
    }

    /// Appends a layer; it is applied after the existing ones in the forward direction.
    pub fn push(&mut self, layer: impl Bijector + 'static) {
        self.layers.push(Box::new(layer));
    }

    pub fn layers(&self) -> &[Box<dyn Bijector>] {
        &self.layers
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    fn run<'a>(
        x: &Tensor,
        layers: impl Iterator<Item = &'a Box<dyn Bijector>>,
        step: impl Fn(&dyn Bijector, &Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let mut h = x.clone();
        let mut log_det = zero_log_det(x)?;
        for layer in layers {
            let (next, ld) = step(layer.as_ref(), &h)?;
            h = next;
            log_det = (log_det + ld)?;
        }
        Ok((h, log_det))
    }
}

impl Bijector for Chain {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Self::run(x, self.layers.iter(), |l, h| l.forward(h))
    }

    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        Self::run(z, self.layers.iter().rev(), |l, h| l.inverse(h))
    }

    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        Self::run(x, self.layers.iter(), |l, h| {
            l.forward_with_context(h, context)
        })
    }

    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        Self::run(z, self.layers.iter().rev(), |l, h| {
            l.inverse_with_context(h, context)
        })
    }

    fn set_training(&mut self, training: bool) {
        for layer in &mut self.layers {
            layer.set_training(training);
        }
    }

    fn batch_statistics(&self) -> bool {
        self.layers.iter().any(|l| l.batch_statistics())
    }

    fn share_batch(&mut self, shared: Option<Arc<dyn SharedBatch>>) {
        for layer in &mut self.layers {
            layer.share_batch(shared.clone());
        }
    }

    fn buffers(&self) -> Vec<Tensor> {
        self.layers.iter().flat_map(|l| l.buffers()).collect()
    }

    /// The layers' stages, in order.
    fn stages(&self) -> Option<Vec<Stage<'_>>> {
        Some(
            self.layers
                .iter()
                .flat_map(|l| stages_of(l.as_ref()))
                .collect(),
        )
    }

    /// Initialises the layers in order, each on the previous layers' output (detached:
    /// initialisation keeps one layer's activations at a time, not the whole graph; and
    /// the last layer's output, which nothing reads, is not computed).
    fn initialize(&self, x: &Tensor, context: Option<&Tensor>) -> Result<()> {
        let mut h = x.clone();
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            layer.initialize(&h, context)?;
            if i + 1 == n {
                break;
            }
            h = match context {
                Some(c) => layer.forward_with_context(&h, c)?.0,
                None => layer.forward(&h)?.0,
            }
            .detach();
        }
        Ok(())
    }
}
