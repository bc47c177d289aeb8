use candle_nn::VarBuilder;
use flow_core::{Bijector, LayerFamily, LayerSpec, SampleLayer};
use flow_nn::{CouplingConfig, ScaleMap};

use crate::{CouplingKind, CouplingLayer, RealNvpConfig};

/// The RealNVP and NICE layers of a model configuration: kinds `affine` and
/// `additive`, each a [`CouplingLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealNvpFamily;

fn check_coupling<T>(c: &CouplingConfig<T>, dim: usize, context_dim: usize) -> Result<(), String> {
    if c.mask.len() != dim {
        return Err(format!(
            "mask of {} features in a model of {dim}",
            c.mask.len()
        ));
    }
    if !c.mask.contains(&true) || !c.mask.contains(&false) {
        return Err(format!(
            "a coupling mask must keep at least one feature and transform at least one, got {:?}",
            c.mask
        ));
    }
    if c.context_dim != context_dim {
        return Err(format!(
            "a layer of {} context features in a model of {context_dim}",
            c.context_dim
        ));
    }
    // Separate networks each output one parameter per feature; a joint one all of
    // them: bounded by two per feature.
    c.conditioner
        .net
        .check(dim.saturating_add(context_dim), dim.saturating_mul(2))
}

impl LayerFamily for RealNvpFamily {
    fn kinds(&self) -> &[&'static str] {
        &["affine", "additive"]
    }

    fn check(&self, spec: &LayerSpec, dim: usize, context_dim: usize) -> Result<(), String> {
        match spec.tagged_as::<CouplingLayer>()? {
            CouplingLayer::Affine(c) => {
                check_coupling(&c, dim, context_dim)?;
                let clamp = match c.transform.scale {
                    ScaleMap::SoftClamp { clamp }
                    | ScaleMap::Tanh { clamp }
                    | ScaleMap::Atan { clamp } => clamp,
                    ScaleMap::Exp | ScaleMap::Sigmoid | ScaleMap::Softplus => 1.0,
                };
                if !(clamp.is_finite() && clamp > 0.0) {
                    return Err(format!("clamp must be positive, got {clamp}"));
                }
                Ok(())
            }
            CouplingLayer::Additive(c) => check_coupling(&c, dim, context_dim),
        }
    }

    fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        spec.tagged_as::<CouplingLayer>()
            .map_err(candle::Error::Msg)?
            .build(vb)
    }

    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        let coupling = match kind {
            "affine" => CouplingKind::Affine,
            "additive" => CouplingKind::Additive,
            _ => return None,
        };
        let cfg = RealNvpConfig::new(2)
            .with_layers(1)
            .with_hidden(8)
            .with_coupling(coupling)
            .with_zero_init(false);
        let spec = LayerSpec::tagged(cfg.layers().first()?).ok()?;
        Some(SampleLayer::new(spec, 2))
    }
}
