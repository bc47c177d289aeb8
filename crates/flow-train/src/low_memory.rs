//! Gradients whose memory does not grow with the flow's depth.
//!
//! Standard backpropagation keeps every layer's activations from the forward pass until
//! the backward pass has used them. The input of an invertible layer can be recomputed
//! from its output instead. The forward pass here runs the layers one at a time
//! ([`flow_core::stages_of`]) without keeping their graphs: it keeps the output, the
//! log-determinant and what cannot be recomputed (what a layer took from the batch as a
//! whole, such as batch norm's statistics; the activations of a layer that cannot be
//! inverted). The backward pass walks the layers from the last: it recomputes the
//! layer's input from its output with the inverse, runs the layer forward again from
//! that input (a fresh leaf) with gradients on, and backpropagates through that layer
//! alone. With `g_y` and `g_ld` the loss's gradients with respect to the layer's
//! output and log-determinant, the surrogate `Σ y·g_y + Σ log_det·g_ld` has the loss's
//! gradients with respect to the layer's parameters and input; the parameters' add up
//! across layers, the input's is the previous layer's `g_y`.
//!
//! Inversion drifts in floating point. Each recomputed layer's reconstruction error is
//! measured: how far the layer's forward pass from the recomputed input lands from the
//! output it was recomputed from, relative to the output's largest value (or to 1 when
//! that is smaller). When a layer's error exceeds the tolerance, the batch is computed
//! again with that layer's activations kept. The decision is the batch's own, so that a
//! step's gradients depend only on the weights and the batch (and a resumed run repeats
//! an uninterrupted one exactly).

use std::collections::BTreeSet;

use candle::{backprop::GradStore, bail, DType, Result, Tensor, Var};
use flow_core::{stages_of, Flow, Stage};
use serde::{Deserialize, Serialize};

use crate::gradient::{add_up, by_parts};

/// The reconstruction error above which a layer keeps its activations, unless
/// [`LowMemory::with_tolerance`] says otherwise. Inverses in f32 land within about 1e-6
/// of their input, relative; drift through a deep chain stays well below this.
pub const DEFAULT_RECONSTRUCTION_TOLERANCE: f64 = 1e-3;

/// Settings of the memory-saving backward pass ([`crate::Trainer::with_low_memory`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowMemory {
    /// The largest reconstruction error (relative, see the module's documentation) a
    /// recomputed layer may show; a layer beyond it keeps its activations instead.
    pub tolerance: f64,
}

impl Default for LowMemory {
    fn default() -> Self {
        Self {
            tolerance: DEFAULT_RECONSTRUCTION_TOLERANCE,
        }
    }
}

impl LowMemory {
    /// The default tolerance, [`DEFAULT_RECONSTRUCTION_TOLERANCE`].
    pub fn new() -> Self {
        Self::default()
    }

    flow_core::with_setters! {
        with_tolerance: tolerance: f64,
    }

    /// Checks the tolerance: positive (infinity recomputes every layer whatever its
    /// error).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.tolerance > 0.0 {
            Ok(())
        } else {
            Err(format!(
                "the reconstruction tolerance must be positive, got {}",
                self.tolerance
            ))
        }
    }
}

/// What the memory-saving backward pass measured over a run; saved in the training
/// summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reconstruction {
    /// Layers the backward pass walks (the flow's stages).
    pub layers: usize,
    /// The largest reconstruction error of a recomputed layer.
    pub max_error: f64,
    /// The largest difference between a batch and its reconstruction through every
    /// layer, relative to the batch's largest value (or to 1): the drift of the whole
    /// chain of inverses.
    pub max_input_error: f64,
    /// The layers (indices among the stages) whose activations were kept in some
    /// batch: those that cannot be inverted, and those whose error exceeded the
    /// tolerance.
    pub kept: Vec<usize>,
    /// Batches computed again for a layer beyond the tolerance.
    pub retries: usize,
    /// The tolerance the errors were held to.
    pub tolerance: f64,
}

/// Computes a flow's loss and gradients layer by layer, keeping the activations only
/// of the layers that need it, and reports what it measured across batches.
#[derive(Debug, Clone)]
pub struct LayerwiseBackprop {
    settings: LowMemory,
    report: Reconstruction,
}

/// What one part of a batch gave: loss, gradients, and the errors measured.
struct PartResult {
    loss: f64,
    grads: Option<GradStore>,
    errors: Vec<f64>,
    input_error: f64,
}

/// What the forward pass keeps of a stage for the backward pass.
enum Kept {
    /// The stage will be recomputed: only what it took from the batch as a whole.
    Record(Vec<Tensor>),
    /// The stage's input as a leaf, and its output and log-det with their graph.
    Graph {
        leaf: Var,
        output: Tensor,
        log_det: Tensor,
    },
}

/// `max|a − b| / max(max|b|, 1)`, as a scalar tensor, detached: kept until the
/// walk ends, it must not hold on to the graph of a layer's pass.
fn relative_error(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (a.detach(), b.detach());
    let diff = (&a - &b)?.abs()?.max_all()?.to_dtype(DType::F64)?;
    let scale = b.abs()?.max_all()?.to_dtype(DType::F64)?.maximum(1.0)?;
    diff / scale
}

impl LayerwiseBackprop {
    pub fn new(settings: LowMemory) -> Self {
        Self {
            report: Reconstruction {
                tolerance: settings.tolerance,
                ..Reconstruction::default()
            },
            settings,
        }
    }

    /// What was measured so far.
    pub fn report(&self) -> &Reconstruction {
        &self.report
    }

    /// The mean negative log-likelihood of the batch `x` (given its context) and, when
    /// it is finite, the gradient of that mean for each of `vars`: what
    /// [`crate::nll_and_gradients`] computes, with the batch split into `parts` the same
    /// way, in memory that does not grow with the number of layers.
    pub fn nll_and_gradients(
        &mut self,
        flow: &Flow,
        vars: &[Var],
        x: &Tensor,
        context: Option<&Tensor>,
        parts: usize,
    ) -> Result<(f64, Option<Vec<Option<Tensor>>>)> {
        let (rows, dim) = x.dims2()?;
        if dim != flow.dim() {
            bail!("input has {dim} features but the model has {}", flow.dim());
        }
        if let Some(c) = context {
            if c.dim(0)? != rows {
                bail!("a context of {} rows for {rows} points", c.dim(0)?);
            }
        }
        // A wrapper that only standardises the context: its inner layers, walked with
        // the standardised context.
        let (root, standardized) = match flow.bijector().inner_with_context(context)? {
            Some((inner, c)) => (inner, c),
            None => (flow.bijector(), None),
        };
        let context = standardized.as_ref().or(context);
        let stages = stages_of(root);
        self.report.layers = stages.len();
        let mut keep: Vec<bool> = stages.iter().map(|s| !s.layer.recomputable()).collect();
        loop {
            let kept = (0..stages.len()).filter(|&i| keep[i]);
            let kept: BTreeSet<usize> = self.report.kept.iter().copied().chain(kept).collect();
            self.report.kept = kept.into_iter().collect();
            let results = by_parts(x, context, parts, |x, c| {
                part(flow, &stages, &keep, x, c, rows)
            })?;
            let mut retry = false;
            for r in &results {
                for (i, &e) in r.errors.iter().enumerate() {
                    self.report.max_error = self.report.max_error.max(e);
                    if e > self.settings.tolerance {
                        keep[i] = true;
                        retry = true;
                    }
                }
                self.report.max_input_error = self.report.max_input_error.max(r.input_error);
            }
            if !retry {
                let results: Vec<(f64, Option<GradStore>)> =
                    results.into_iter().map(|r| (r.loss, r.grads)).collect();
                return add_up(vars, &results, false);
            }
            // Gradients through a drifted reconstruction are not the loss's: the batch
            // again, with those layers' activations kept.
            self.report.retries += 1;
        }
    }
}

/// One part of a batch of `batch` rows: its share of the mean NLL, its gradients
/// (when finite) and each stage's reconstruction error (0 for kept stages).
fn part(
    flow: &Flow,
    stages: &[Stage<'_>],
    keep: &[bool],
    x: &Tensor,
    context: Option<&Tensor>,
    batch: usize,
) -> Result<PartResult> {
    let scale = -1.0 / batch as f64;
    // Forward: every stage's output detached, its graph dropped, unless it is kept.
    let mut h = x.clone();
    let mut log_det = Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?;
    let mut kept = Vec::with_capacity(stages.len());
    for (i, stage) in stages.iter().enumerate() {
        let (mapped, rest) = stage.split(&h)?;
        let (y, ld) = if keep[i] {
            let leaf = Var::from_tensor(&mapped.detach())?;
            let (output, ld, _) = stage
                .layer
                .forward_recorded(leaf.as_tensor(), context, true)?;
            let next = (output.detach(), ld.detach());
            kept.push(Kept::Graph {
                leaf,
                output,
                log_det: ld,
            });
            next
        } else {
            let (y, ld, record) = stage.layer.forward_recorded(&mapped, context, true)?;
            kept.push(Kept::Record(record));
            (y.detach(), ld.detach())
        };
        h = Stage::join(y, rest.as_ref())?;
        log_det = (log_det + ld)?;
    }
    // The base: the loss, and its gradient with respect to the latent.
    let z = Var::from_tensor(&h)?;
    let base_log_prob = flow.base().log_prob(z.as_tensor())?;
    let loss = (&base_log_prob + &log_det)?
        .sum_all()?
        .affine(scale, 0.0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let mut errors = vec![0.0; stages.len()];
    if !loss.is_finite() {
        return Ok(PartResult {
            loss,
            grads: None,
            errors,
            input_error: 0.0,
        });
    }
    let mut grads = GradStore::default();
    let mut base_grads = base_log_prob.sum_all()?.affine(scale, 0.0)?.backward()?;
    let mut g = take_grad(&mut base_grads, &z)?;
    add_detached(&mut grads, base_grads)?;
    // Backward, from the last stage: every stage's log-det has the gradient `scale`.
    let mut error_tensors = Vec::new();
    let mut input_error = None;
    for (i, (stage, kept)) in stages.iter().zip(kept).enumerate().rev() {
        let (y, rest) = stage.split(&h)?;
        let (g_y, g_rest) = stage.split(&g)?;
        let (leaf, output, ld) = match kept {
            Kept::Graph {
                leaf,
                output,
                log_det,
            } => (leaf, output, log_det),
            Kept::Record(record) if i == 0 => {
                // The first stage's input is the batch itself: no need to recompute it,
                // and its reconstruction measures the drift of the whole chain.
                let (recomputed, _) = stage.layer.inverse_recorded(&y, context, &record)?;
                let (mapped, _) = stage.split(x)?;
                input_error = Some(relative_error(&recomputed, &mapped)?);
                let leaf = Var::from_tensor(&mapped)?;
                let (output, ld, _) =
                    stage
                        .layer
                        .forward_recorded(leaf.as_tensor(), context, false)?;
                error_tensors.push((i, relative_error(&output, &y)?));
                (leaf, output, ld)
            }
            Kept::Record(record) => {
                let (leaf, output, ld) = stage.layer.recompute(&y, context, &record)?;
                error_tensors.push((i, relative_error(&output, &y)?));
                (leaf, output, ld)
            }
        };
        let surrogate = ((&output * &g_y)?.sum_all()? + ld.sum_all()?.affine(scale, 0.0)?)?;
        let mut stage_grads = surrogate.backward()?;
        let g_x = take_grad(&mut stage_grads, &leaf)?;
        add_detached(&mut grads, stage_grads)?;
        h = Stage::join(leaf.as_tensor().detach(), rest.as_ref())?;
        g = Stage::join(g_x, g_rest.as_ref())?;
    }
    for (i, e) in error_tensors {
        errors[i] = e.to_scalar::<f64>()?;
    }
    let input_error = input_error
        .map(|e| e.to_scalar::<f64>())
        .transpose()?
        .unwrap_or(0.0);
    Ok(PartResult {
        loss,
        grads: Some(grads),
        errors,
        input_error,
    })
}

/// The gradient of the leaf `v`, taken out of `grads`; zeros when nothing depended on
/// it. Detached: a fused op's backward pass may leave the graph of its computation on
/// the gradient, which would keep the layer's activations alive.
fn take_grad(grads: &mut GradStore, v: &Var) -> Result<Tensor> {
    match grads.remove(v.as_tensor()) {
        Some(g) => Ok(g.detach()),
        None => v.as_tensor().zeros_like(),
    }
}

/// Adds one layer's gradients into the running totals, detached (see [`take_grad`]).
fn add_detached(total: &mut GradStore, layer: GradStore) -> Result<()> {
    for &id in layer.get_ids() {
        let Some(g) = layer.get_id(id) else {
            continue;
        };
        let g = match total.get_id(id) {
            Some(sum) => (sum + g.detach())?,
            None => g.detach(),
        };
        total.insert_id(id, g);
    }
    Ok(())
}
