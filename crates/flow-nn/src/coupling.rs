use candle::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::{Bijector, LayerConfig};
use serde::{Deserialize, Serialize};

use crate::layer::{check_context, oriented};
use crate::transform::apply_transform;
use crate::{Conditioner, ConditionerConfig, Features, Mask, Transform};

/// One coupling layer, fully specified: the mask, the conditioner and the
/// element-wise transform's own settings (flattened beside the others in JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CouplingConfig<T> {
    /// `mask[j] == true` keeps feature `j`; the others are transformed.
    pub mask: Vec<bool>,
    pub conditioner: ConditionerConfig,
    #[serde(flatten)]
    pub transform: T,
    /// Use the layer in the opposite direction: its `forward` applies the coupling's
    /// inverse formula. For layers defined noise → data, as some libraries do.
    /// Honoured by [`LayerConfig::build`].
    #[serde(default)]
    pub inverted: bool,
    /// Features of the context a conditional layer receives (0: unconditional).
    #[serde(default)]
    pub context_dim: usize,
}

impl<T: Transform> LayerConfig for CouplingConfig<T> {
    /// The mask against `dim` features, the context, the networks' widths and the
    /// transform's settings.
    fn check(&self, dim: usize, context_dim: usize) -> std::result::Result<(), String> {
        if self.mask.len() != dim {
            return Err(format!(
                "mask of {} features in a model of {dim}",
                self.mask.len()
            ));
        }
        if !self.mask.contains(&true) || !self.mask.contains(&false) {
            return Err(format!(
                "a coupling mask must keep at least one feature and transform at least one, got {:?}",
                self.mask
            ));
        }
        check_context(self.context_dim, context_dim)?;
        // The transform first: its settings (a spline's bins) size the network's output.
        self.transform.check()?;
        // Separate networks each output one parameter per feature, a joint one all of
        // them: bounded by the transform's parameters per feature.
        self.conditioner.net.check(
            dim.saturating_add(context_dim),
            dim.saturating_mul(self.transform.params().len()),
        )
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
        Ok(oriented(Coupling::new(self, vb)?, self.inverted))
    }
}

/// A coupling layer: a [`Mask`] splits the features into kept `a` and transformed
/// `b`; a [`Conditioner`] reads `x_a` (and the context, if any) and outputs the
/// parameters of an element-wise [`Transform`] applied to `x_b`:
/// - forward (data → latent): `z_b = f(x_b; θ(x_a))`, `z_a = x_a`;
/// - inverse: `x_b = f⁻¹(z_b; θ(z_a))`;
///
/// with `log|det|` the transform's. RealNVP's affine coupling is
/// `Coupling<Affine>`, NICE's additive coupling `Coupling<Shift>`. With a context
/// dimension, the conditioner sees `[x_a | context]`.
#[derive(Debug, Clone)]
pub struct Coupling<T> {
    mask: Mask,
    conditioner: Conditioner,
    transform: T,
    context_dim: usize,
}

impl<T: Transform> Coupling<T> {
    /// Parameters are stored under `vb`: one network per transform parameter, named
    /// after it (`s.*`, `t.*`), or `net.*` for a joint conditioner.
    pub fn new(cfg: &CouplingConfig<T>, vb: VarBuilder) -> Result<Self> {
        let mask = Mask::new(cfg.mask.clone(), vb.device())?;
        let in_dim = mask.n_kept() + cfg.context_dim;
        let conditioner = Conditioner::new(
            &cfg.conditioner,
            in_dim,
            mask.n_transformed(),
            &cfg.transform.params(),
            vb,
        )?;
        Ok(Self {
            mask,
            conditioner,
            transform: cfg.transform.clone(),
            context_dim: cfg.context_dim,
        })
    }

    pub fn mask(&self) -> &Mask {
        &self.mask
    }

    pub fn transform(&self) -> &T {
        &self.transform
    }

    /// `(y, log|det|)` for the forward (`inverse = false`) or inverse map.
    fn apply(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        inverse: bool,
    ) -> Result<(Tensor, Tensor)> {
        let xa = self.mask.kept_input(x)?;
        let h = conditioner_input(&xa, context, self.context_dim)?;
        let theta = if self.transform.stacked() {
            vec![self.conditioner.params_stacked(&h)?]
        } else {
            self.conditioner.params(&h)?
        };
        let features = Features::Masked {
            mask: &self.mask,
            kept: &xa,
        };
        apply_transform(&self.transform, x, features, &theta, inverse)
    }
}

/// `[kept | context]`, checking that a context is given exactly when one is expected.
fn conditioner_input(
    kept: &Tensor,
    context: Option<&Tensor>,
    context_dim: usize,
) -> Result<Tensor> {
    match (context, context_dim) {
        (None, 0) => Ok(kept.clone()),
        (None, d) => {
            bail!("this coupling layer is conditional: it needs a context of {d} features")
        }
        (Some(c), d) if c.dim(1)? == d && d > 0 => Tensor::cat(&[kept, c], 1),
        (Some(c), d) => bail!("context has {} features, the layer expects {d}", c.dim(1)?),
    }
}

impl<T: Transform> Bijector for Coupling<T> {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(x, None, false)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(z, None, true)
    }
    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(x, Some(context), false)
    }
    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(z, Some(context), true)
    }
}
