//! Element-wise transforms: the monotone maps a coupling (or autoregressive) layer
//! applies to each transformed feature, with parameters its conditioner outputs.

use candle::{Result, Tensor};

/// An element-wise monotone map `y_j = f(x_j; θ_j)` with `P` parameters per feature.
///
/// [`apply`](Transform::apply) is the reference, from plain candle ops; a transform
/// with a fused kernel offers it through [`apply_fused`](Transform::apply_fused), which
/// the layer tries first.
pub trait Transform: std::fmt::Debug + Clone + Send + Sync + 'static {
    /// Its parameters' names, in the order the conditioner outputs them; separate
    /// conditioner networks are stored under these names.
    fn params(&self) -> Vec<String>;

    /// Whether [`apply`](Transform::apply) takes the parameters stacked as one tensor
    /// `(batch, n, P)` (a spline's many), rather than as `P` tensors `(batch, n)`.
    fn stacked(&self) -> bool {
        false
    }

    /// `(y, log|det ∂y/∂x|)` for features `x` `(batch, n)` and parameters
    /// `theta[p]` `(batch, n)` (or `theta[0]` `(batch, n, P)` when
    /// [`stacked`](Transform::stacked)): the map, or its inverse when `inverse` is set.
    /// The log-det is `(batch,)`, summed over the features.
    fn apply(&self, x: &Tensor, theta: &[Tensor], inverse: bool) -> Result<(Tensor, Tensor)>;

    /// The same step over a whole input `x` `(batch, dim)` whose features
    /// `transformed` are the ones mapped (the others pass through), as a fused kernel
    /// where one exists for `x`; `None` otherwise.
    fn apply_fused(
        &self,
        x: &Tensor,
        transformed: &[usize],
        theta: &[Tensor],
        inverse: bool,
    ) -> Option<Result<(Tensor, Tensor)>> {
        let _ = (x, transformed, theta, inverse);
        None
    }
}
