use candle::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::{Bijector, Chain, Inverse, Permute, Reverse};

use crate::{AdditiveCoupling, AffineCoupling, LayerConfig, RealNvpConfig};

/// Builds one layer; its parameters live under `vb`.
pub fn build_layer(cfg: &LayerConfig, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
    fn maybe_inverted(b: impl Bijector + 'static, inverted: bool) -> Box<dyn Bijector> {
        if inverted {
            Box::new(Inverse(b))
        } else {
            Box::new(b)
        }
    }
    Ok(match cfg {
        LayerConfig::Affine(c) => maybe_inverted(AffineCoupling::new(c, vb)?, c.inverted),
        LayerConfig::Additive(c) => maybe_inverted(AdditiveCoupling::new(c, vb)?, c.inverted),
        LayerConfig::Permute { perm } => Box::new(Permute::new(perm.clone(), vb.device())?),
        LayerConfig::Reverse { dim } => Box::new(Reverse::new(*dim, vb.device())?),
    })
}

/// A stack of coupling layers: a [`Chain`] built from a [`RealNvpConfig`] or from an
/// explicit list of [`LayerConfig`]s. Layer `i` stores its parameters under
/// `{i}.*` of the given `VarBuilder` (for example `3.s.0.weight`).
///
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::VarMap;
/// use flow_core::{seeded_var_builder, Flow, StandardNormal};
/// use flow_realnvp::{RealNvp, RealNvpConfig};
/// use rand::{rngs::StdRng, SeedableRng};
///
/// # fn main() -> candle::Result<()> {
/// let device = Device::Cpu;
/// let varmap = VarMap::new(); // holds the trainable tensors
/// let vb = seeded_var_builder(&varmap, 0, DType::F32, &device);
/// let cfg = RealNvpConfig::new(2).with_layers(4).with_hidden(64);
/// let flow = Flow::new(
///     RealNvp::new(&cfg, vb.pp("layers"))?,
///     StandardNormal::new(2, DType::F32, &device),
/// );
///
/// let x = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &device)?;
/// let log_p = flow.log_prob(&x)?; // (2,) log-densities in nats
/// assert_eq!(log_p.dims(), &[2]);
///
/// let mut rng = StdRng::seed_from_u64(7);
/// let samples = flow.sample(1000, &mut rng)?; // (1000, 2)
/// assert_eq!(samples.dims(), &[1000, 2]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RealNvp {
    chain: Chain,
}

impl RealNvp {
    pub fn new(cfg: &RealNvpConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("{e}");
        }
        Self::from_layers(&cfg.layer_configs(), vb)
    }

    pub fn from_layers(layers: &[LayerConfig], vb: VarBuilder) -> Result<Self> {
        let layers = layers
            .iter()
            .enumerate()
            .map(|(i, l)| build_layer(l, vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            chain: Chain::new(layers),
        })
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }
}

impl Bijector for RealNvp {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.chain.forward(x)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.chain.inverse(z)
    }
    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.chain.forward_with_context(x, context)
    }
    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.chain.inverse_with_context(z, context)
    }
    fn set_training(&mut self, training: bool) {
        self.chain.set_training(training)
    }
}
