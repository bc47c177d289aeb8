use candle::{bail, Result, Tensor};
use candle_nn::{Module, VarBuilder};
use flow_core::Bijector;
use serde::{Deserialize, Serialize};

use crate::{made_masks, Activation, Mlp, NetConfig, Transform};

/// One autoregressive layer, fully specified: the order of its features, its MADE
/// network and the element-wise transform's own settings (flattened beside the others
/// in JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoregressiveConfig<T> {
    /// `order[k]` is the feature transformed `k`-th: it depends on the features before
    /// it in this list.
    pub order: Vec<usize>,
    /// Widths of the MADE network's hidden layers.
    pub hidden: Vec<usize>,
    #[serde(default)]
    pub activation: Activation,
    #[serde(flatten)]
    pub transform: T,
    /// Use the layer in the opposite direction (IAF: sampling in one pass, density in
    /// `d`).
    #[serde(default)]
    pub inverted: bool,
    /// Features of the context a conditional layer receives (0: unconditional).
    #[serde(default)]
    pub context_dim: usize,
    /// Start the output layer at zero, so the layer starts as the identity.
    #[serde(default)]
    pub zero_init: bool,
}

impl<T> AutoregressiveConfig<T> {
    /// Checks the order and the widths against `dim` features.
    pub fn check(&self, dim: usize) -> std::result::Result<(), String> {
        let mut seen = vec![false; dim];
        if self.order.len() != dim {
            return Err(format!(
                "an order of {} features in a model of {dim}",
                self.order.len()
            ));
        }
        for &i in &self.order {
            if i >= dim || std::mem::replace(&mut seen[i], true) {
                return Err(format!("not an order of 0..{dim}: {:?}", self.order));
            }
        }
        if self.hidden.contains(&0) {
            return Err("a hidden layer of width 0".into());
        }
        Ok(())
    }
}

/// An autoregressive layer (MAF, and with a spline, autoregressive NSF): a MADE network
/// reads all features `x` (and the context) and outputs the parameters of each feature's
/// element-wise [`Transform`] from the features before it in the order alone, so
/// - forward (data → latent, the density): `z = f(x; θ(x))` in one pass;
/// - inverse: `x = f⁻¹(z; θ(x))`, feature by feature: `d` passes.
///
/// The MADE network is stored under `made.*` (as a plain MLP: `made.0`, `made.2`, …);
/// its masks follow from the order and are not stored.
#[derive(Debug, Clone)]
pub struct Autoregressive<T> {
    made: Mlp,
    transform: T,
    dim: usize,
    context_dim: usize,
}

impl<T: Transform> Autoregressive<T> {
    pub fn new(cfg: &AutoregressiveConfig<T>, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.order.len();
        if let Err(e) = cfg.check(dim) {
            bail!("{e}");
        }
        let mut rank = vec![0; dim];
        for (k, &i) in cfg.order.iter().enumerate() {
            rank[i] = k + 1;
        }
        let params = cfg.transform.params().len();
        let net = NetConfig::Mlp {
            hidden: cfg.hidden.clone(),
            activation: cfg.activation,
        };
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let made = Mlp::new(
            &net,
            dim + cfg.context_dim,
            dim * params,
            cfg.zero_init,
            vb.pp("made"),
        )?;
        let masks = made_masks(&rank, cfg.context_dim, &cfg.hidden, params, &device)?
            .into_iter()
            .map(|m| m.to_dtype(dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            made: made.with_masks(masks)?,
            transform: cfg.transform.clone(),
            dim,
            context_dim: cfg.context_dim,
        })
    }

    /// The transform's parameters for every feature, from `x` (and the context).
    fn params(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Vec<Tensor>> {
        let input = match (context, self.context_dim) {
            (None, 0) => x.clone(),
            (Some(c), d) if d > 0 && c.dim(1)? == d => Tensor::cat(&[x, c], 1)?,
            (None, d) => bail!(
                "this autoregressive layer is conditional: it needs a context of {d} features"
            ),
            (Some(c), d) => bail!("context has {} features, the layer expects {d}", c.dim(1)?),
        };
        let out = self.made.forward(&input)?;
        let b = out.dim(0)?;
        let p = self.transform.params().len();
        let stacked = out.reshape((b, self.dim, p))?;
        if self.transform.stacked() {
            Ok(vec![stacked])
        } else {
            (0..p)
                .map(|k| stacked.narrow(2, k, 1)?.squeeze(2))
                .collect()
        }
    }

    fn forward_pass(&self, x: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let theta = self.params(x, context)?;
        self.transform.apply(x, &theta, false)
    }

    /// `d` passes: after pass `k` the first `k + 1` features of the order are exact.
    fn inverse_pass(&self, z: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let mut x = z.zeros_like()?;
        let mut log_det = None;
        for _ in 0..self.dim {
            let theta = self.params(&x, context)?;
            let (next, ld) = self.transform.apply(z, &theta, true)?;
            x = next;
            log_det = Some(ld);
        }
        match log_det {
            Some(ld) => Ok((x, ld)),
            None => bail!("an autoregressive layer needs at least one feature"),
        }
    }
}

impl<T: Transform> Bijector for Autoregressive<T> {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_pass(x, None)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inverse_pass(z, None)
    }
    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_pass(x, Some(context))
    }
    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inverse_pass(z, Some(context))
    }
}

/// How a stack of autoregressive layers orders its features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Order {
    /// `0, 1, …, d − 1` in even layers, reversed in odd ones.
    #[default]
    Alternate,
    /// A permutation per layer, drawn from a generator seeded with `seed` and the layer.
    Random { seed: u64 },
}

impl Order {
    /// The order of layer `i` over `dim` features.
    pub fn of(&self, i: usize, dim: usize) -> Vec<usize> {
        use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
        let mut order: Vec<usize> = (0..dim).collect();
        match *self {
            Order::Alternate if i % 2 == 1 => order.reverse(),
            Order::Alternate => {}
            Order::Random { seed } => {
                let mix = seed
                    ^ (i as u64)
                        .wrapping_add(1)
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
                order.shuffle(&mut StdRng::seed_from_u64(mix));
            }
        }
        order
    }
}
