use candle::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::{Bijector, Chain, LayerConfig, Stage};
use flow_nn::{Affine, Coupling, Shift};

use crate::{CouplingLayer, RealNvpConfig};

/// RealNVP's affine coupling layer: with `a` the kept and `b` the transformed features,
/// - forward (data → latent): `z_b = x_b ⊙ exp(s(x_a)) + t(x_a)`, `z_a = x_a`,
///   `log|det| = Σ s(x_a)`;
/// - inverse: `x_b = (z_b − t(z_a)) ⊙ exp(−s(z_a))`, `log|det| = −Σ s(z_a)`,
///
/// where `s` is the conditioner's raw output through the transform's
/// [`ScaleMap`](crate::ScaleMap).
pub type AffineCoupling = Coupling<Affine>;

/// NICE's additive coupling layer: `z_b = x_b + t(x_a)`, `z_a = x_a`; log-det 0.
pub type AdditiveCoupling = Coupling<Shift>;

/// A stack of coupling layers: a [`Chain`] built from a [`RealNvpConfig`] or from an
/// explicit list of [`CouplingLayer`]s. Layer `i` stores its parameters under
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
        Self::from_layers(&cfg.layers(), vb)
    }

    pub fn from_layers(layers: &[CouplingLayer], vb: VarBuilder) -> Result<Self> {
        let layers = layers
            .iter()
            .enumerate()
            .map(|(i, l)| l.build(vb.pp(i)))
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
    fn batch_statistics(&self) -> bool {
        self.chain.batch_statistics()
    }
    fn buffers(&self) -> Vec<Tensor> {
        self.chain.buffers()
    }
    fn initialize(&self, x: &Tensor, context: Option<&Tensor>) -> Result<()> {
        self.chain.initialize(x, context)
    }
    fn stages(&self) -> Option<Vec<Stage<'_>>> {
        self.chain.stages()
    }
}
