use candle_nn::VarBuilder;
use flow_core::{Bijector, LayerFamily, LayerSpec, SampleLayer};
use flow_nn::Transform;

use crate::{NsfConfig, NsfKind, Spline, SplineLayer};

/// The spline flows' layers of a model configuration: kinds `spline-coupling` and
/// `spline-autoregressive`, each a [`SplineLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct NsfFamily;

impl LayerFamily for NsfFamily {
    fn kinds(&self) -> &[&'static str] {
        &["spline-coupling", "spline-autoregressive"]
    }

    fn check(&self, spec: &LayerSpec, dim: usize, context_dim: usize) -> Result<(), String> {
        let context = match spec.tagged_as::<SplineLayer>()? {
            SplineLayer::SplineCoupling(c) => {
                // The bins are bounded first: they size the network's output.
                c.transform.check()?;
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
                c.conditioner.net.check(
                    dim.saturating_add(context_dim),
                    dim.saturating_mul(c.transform.params().len()),
                )?;
                c.context_dim
            }
            SplineLayer::SplineAutoregressive(c) => {
                c.transform.check()?;
                c.check(dim)?;
                c.context_dim
            }
        };
        if context != context_dim {
            return Err(format!(
                "a layer of {context} context features in a model of {context_dim}"
            ));
        }
        Ok(())
    }

    fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        spec.tagged_as::<SplineLayer>()
            .map_err(candle::Error::Msg)?
            .build(vb)
    }

    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        let nsf = match kind {
            "spline-coupling" => NsfKind::Coupling,
            "spline-autoregressive" => NsfKind::Autoregressive,
            _ => return None,
        };
        let cfg = NsfConfig::new(2)
            .with_kind(nsf)
            .with_layers(1)
            .with_hidden(8)
            .with_spline(Spline::new(4, 3.0))
            .with_zero_init(false);
        let spec = LayerSpec::tagged(cfg.layers().first()?).ok()?;
        Some(SampleLayer::new(spec, 2))
    }
}
