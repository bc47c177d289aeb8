//! Element-wise transforms: the monotone maps a coupling (or autoregressive) layer
//! applies to each transformed feature, with parameters its conditioner outputs.

use candle::{Result, Tensor};
use flow_kernels::{fused, Op};

use crate::Mask;

/// An element-wise monotone map `y_j = f(x_j; θ_j)` with `P` parameters per feature.
///
/// A transform has two doors, which every layer uses the same way, through
/// [`apply_transform`]: [`apply`](Transform::apply) is the reference, from plain candle
/// ops, and [`apply_fused`](Transform::apply_fused) its fused
/// [`kernel`](Transform::kernel), taken where [`flow_kernels::fused`] says that kernel
/// runs.
pub trait Transform: std::fmt::Debug + Clone + Send + Sync + 'static {
    /// Its parameters' names, in the order the conditioner outputs them; separate
    /// conditioner networks are stored under these names.
    fn params(&self) -> Vec<String>;

    /// Whether [`apply`](Transform::apply) takes the parameters stacked as one tensor
    /// `(batch, n, P)` (a spline's many), rather than as `P` tensors `(batch, n)`.
    fn stacked(&self) -> bool {
        false
    }

    /// Checks the settings; the message names the first that is out of range.
    fn check(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    /// `(y, log|det ∂y/∂x|)` for features `x` `(batch, n)` and parameters
    /// `theta[p]` `(batch, n)` (or `theta[0]` `(batch, n, P)` when
    /// [`stacked`](Transform::stacked)): the map, or its inverse when `inverse` is set.
    /// The log-det is `(batch,)`, summed over the features. The reference the kernel is
    /// tested against.
    fn apply(&self, x: &Tensor, theta: &[Tensor], inverse: bool) -> Result<(Tensor, Tensor)>;

    /// The op of the fused kernel behind [`apply_fused`](Transform::apply_fused), if
    /// the transform has one.
    fn kernel(&self) -> Option<Op> {
        None
    }

    /// The same step as [`apply`](Transform::apply) on the `features` of a layer's
    /// whole input `x` `(batch, dim)` (the others pass through), as the fused kernel:
    /// `(y, log|det|)` with `y` `(batch, dim)`. For a device and dtype where
    /// [`flow_kernels::fused`] takes the [`kernel`](Transform::kernel); a transform
    /// without one runs its reference.
    fn apply_fused(
        &self,
        x: &Tensor,
        features: Features,
        theta: &[Tensor],
        inverse: bool,
    ) -> Result<(Tensor, Tensor)> {
        reference(self, x, features, theta, inverse)
    }
}

/// The features of a layer's input `x` `(batch, dim)` that its transform maps.
#[derive(Debug, Clone, Copy)]
pub enum Features<'a> {
    /// Every feature, in order (an autoregressive layer): `indices` is `0..dim`.
    All { indices: &'a [usize] },
    /// A coupling's transformed features; its kept features `kept` `(batch, n_kept)`
    /// pass through.
    Masked { mask: &'a Mask, kept: &'a Tensor },
}

impl<'a> Features<'a> {
    /// The mapped features' indices in `x`, in the order of the parameters' columns.
    pub fn indices(&self) -> &'a [usize] {
        match *self {
            Self::All { indices } => indices,
            Self::Masked { mask, .. } => mask.transformed(),
        }
    }

    /// The mapped features of `x`, `(batch, n)`.
    pub fn select(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::All { .. } => Ok(x.clone()),
            Self::Masked { mask, .. } => mask.transformed_input(x),
        }
    }

    /// The layer's output `(batch, dim)` from the mapped features' images `y`
    /// `(batch, n)`.
    pub fn merge(&self, y: Tensor) -> Result<Tensor> {
        match self {
            Self::All { .. } => Ok(y),
            Self::Masked { mask, kept } => mask.merge(kept, &y),
        }
    }
}

/// The reference step on a layer's whole input: the mapped features through
/// [`Transform::apply`], merged back with the others.
fn reference<T: Transform>(
    t: &T,
    x: &Tensor,
    features: Features,
    theta: &[Tensor],
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    let (y, log_det) = t.apply(&features.select(x)?, theta, inverse)?;
    Ok((features.merge(y)?, log_det))
}

/// A layer's one door to its transform: `(y, log|det|)` for the `features` of `x`
/// `(batch, dim)`, through the fused kernel where [`flow_kernels::fused`] takes it for
/// `x` (fusion on, a kernel for the dtype and device), else through the reference.
pub fn apply_transform<T: Transform>(
    t: &T,
    x: &Tensor,
    features: Features,
    theta: &[Tensor],
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    match t.kernel() {
        Some(op) if fused(op, x) => t.apply_fused(x, features, theta, inverse),
        _ => reference(t, x, features, theta, inverse),
    }
}
