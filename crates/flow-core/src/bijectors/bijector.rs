use std::sync::Arc;

use candle::{Result, Tensor, Var};

use super::Stage;

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
///
/// And five let a trainer save memory by recomputing each layer's input from its output
/// instead of keeping it for the gradient:
/// - [`stages`](Bijector::stages) takes a composite bijector apart into its layers;
/// - [`recomputable`](Bijector::recomputable) says whether a layer's inverse undoes its
///   forward pass;
/// - [`forward_recorded`](Bijector::forward_recorded) and
///   [`inverse_recorded`](Bijector::inverse_recorded) keep and use what a forward pass
///   took from the batch as a whole (batch norm's statistics);
/// - [`recompute`](Bijector::recompute) recomputes the input and runs the forward pass
///   again from it, with the gradient on.
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

    /// The bijector as the sequence of layers it applies, in forward order, for a
    /// backward pass that walks them one at a time: a composite bijector (a chain, a
    /// multi-scale flow) lists its layers' stages ([`stages_of`](super::stages_of)
    /// each). `None`, the default: the bijector is one layer.
    fn stages(&self) -> Option<Vec<Stage<'_>>> {
        None
    }

    /// For a wrapper that only rewrites the context before the bijector inside reads it
    /// (context standardisation), that bijector and the context as it reads it, so that
    /// a layer-by-layer pass can walk the inner bijector's [`stages`](Bijector::stages)
    /// with the rewritten context. `None`, the default, for every other bijector.
    fn inner_with_context(
        &self,
        context: Option<&Tensor>,
    ) -> Result<Option<(&dyn Bijector, Option<Tensor>)>> {
        let _ = context;
        Ok(None)
    }

    /// Whether the layer's input can be recomputed from its output: its inverse
    /// ([`inverse_recorded`](Bijector::inverse_recorded)) undoes the forward pass of the
    /// current mode, up to rounding. By default every layer but one that uses batch
    /// statistics (whose `inverse` undoes the evaluation-mode map, not the batch's); a
    /// layer that says false keeps its activations in a memory-saving backward pass.
    fn recomputable(&self) -> bool {
        !self.batch_statistics()
    }

    /// The forward pass (given the context, if any), with what it took from the batch
    /// as a whole that its inverse needs to undo it (batch norm while training: the
    /// batch's mean and variance), detached. `update`: whether the pass updates the
    /// layer's state (running averages) as `forward` does; a backward pass that runs
    /// it again passes false. The default is `forward`, recording nothing.
    fn forward_recorded(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        update: bool,
    ) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
        let _ = update;
        let (z, log_det) = match context {
            Some(c) => self.forward_with_context(x, c)?,
            None => self.forward(x)?,
        };
        Ok((z, log_det, Vec::new()))
    }

    /// The inverse of the [`forward_recorded`](Bijector::forward_recorded) pass that
    /// recorded `record`. The default is `inverse`.
    fn inverse_recorded(
        &self,
        z: &Tensor,
        context: Option<&Tensor>,
        record: &[Tensor],
    ) -> Result<(Tensor, Tensor)> {
        let _ = record;
        match context {
            Some(c) => self.inverse_with_context(z, c),
            None => self.inverse(z),
        }
    }

    /// The layer's input recomputed from its output `z` (and the record of the
    /// [`forward_recorded`](Bijector::forward_recorded) pass that gave it), as a leaf
    /// of the gradient, and the forward pass from that leaf with the gradient on,
    /// leaving the layer's state alone: `(input, output, log-det)`, the output `z` up
    /// to rounding. The default is [`recompute_by_inverse`]; a layer whose inverse and
    /// forward pass share work (a coupling's conditioner reads the same features
    /// either way) can do both at once.
    fn recompute(
        &self,
        z: &Tensor,
        context: Option<&Tensor>,
        record: &[Tensor],
    ) -> Result<(Var, Tensor, Tensor)> {
        recompute_by_inverse(self, z, context, record)
    }
}

/// [`Bijector::recompute`] in two passes: the inverse, then the forward pass from its
/// result made a leaf.
pub fn recompute_by_inverse<B: Bijector + ?Sized>(
    layer: &B,
    z: &Tensor,
    context: Option<&Tensor>,
    record: &[Tensor],
) -> Result<(Var, Tensor, Tensor)> {
    let (x, _) = layer.inverse_recorded(z, context, record)?;
    let leaf = Var::from_tensor(&x.detach())?;
    let (output, log_det, _) = layer.forward_recorded(leaf.as_tensor(), context, false)?;
    Ok((leaf, output, log_det))
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
    fn stages(&self) -> Option<Vec<Stage<'_>>> {
        (**self).stages()
    }
    fn inner_with_context(
        &self,
        context: Option<&Tensor>,
    ) -> Result<Option<(&dyn Bijector, Option<Tensor>)>> {
        (**self).inner_with_context(context)
    }
    fn recomputable(&self) -> bool {
        (**self).recomputable()
    }
    fn forward_recorded(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        update: bool,
    ) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
        (**self).forward_recorded(x, context, update)
    }
    fn inverse_recorded(
        &self,
        z: &Tensor,
        context: Option<&Tensor>,
        record: &[Tensor],
    ) -> Result<(Tensor, Tensor)> {
        (**self).inverse_recorded(z, context, record)
    }
    fn recompute(
        &self,
        z: &Tensor,
        context: Option<&Tensor>,
        record: &[Tensor],
    ) -> Result<(Var, Tensor, Tensor)> {
        (**self).recompute(z, context, record)
    }
}
