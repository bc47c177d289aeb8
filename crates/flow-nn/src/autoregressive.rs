use candle::{bail, Result, Tensor};
use candle_nn::{init::Init, Module, VarBuilder};
use flow_core::{Bijector, LayerConfig};
use serde::{Deserialize, Serialize};

use crate::layer::{check_context, oriented};
use crate::transform::apply_transform;
use crate::{made::check_made_masks, made_masks, Activation, Features, Mlp, NetConfig, Transform};

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
    /// `d`). Honoured by [`LayerConfig::build`].
    #[serde(default)]
    pub inverted: bool,
    /// Features of the context a conditional layer receives (0: unconditional).
    #[serde(default)]
    pub context_dim: usize,
    /// Start the output layer at zero, so the layer starts as the identity.
    #[serde(default)]
    pub zero_init: bool,
    /// A residual MADE of this many blocks (nflows' default network): `Linear(in, h)`,
    /// blocks `u + L₁(act(L₀(act(u))))`, `Linear(h, out)`, with `hidden` holding the
    /// one width `h`. 0: a plain MLP through the `hidden` widths.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub residual_blocks: usize,
    /// The MADE masks are tensors of the layer (`made.{layer}.mask`, buffers that
    /// checkpoints keep) instead of following from `order`: weights imported from a
    /// library that assigns MADE degrees its own way only work with that library's
    /// masks. They are checked against `order` when the layer is built; a fresh layer
    /// starts with the masks `order` gives.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stored_masks: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl<T: Transform> AutoregressiveConfig<T> {
    /// Checks the order and the network's sizes against `dim` features (the
    /// transform's own settings are checked first, by its family: they decide how many
    /// parameters the network outputs).
    pub fn check(&self, dim: usize) -> std::result::Result<(), String> {
        // The order's length is that of a list read from a file, so `dim` is bounded
        // before the `seen` flags are allocated.
        if self.order.len() != dim {
            return Err(format!(
                "an order of {} features in a model of {dim}",
                self.order.len()
            ));
        }
        let mut seen = vec![false; dim];
        for &i in &self.order {
            if i >= dim || std::mem::replace(&mut seen[i], true) {
                return Err(format!("not an order of 0..{dim}: {:?}", self.order));
            }
        }
        if self.residual_blocks > 0 && self.hidden.len() != 1 {
            return Err(format!(
                "a residual MADE has one hidden width, got {:?}",
                self.hidden
            ));
        }
        let outputs = dim.saturating_mul(self.transform.params().len());
        self.net()
            .check(dim.saturating_add(self.context_dim), outputs)
    }
}

impl<T> AutoregressiveConfig<T> {
    /// The network: a plain MLP, or a residual one.
    fn net(&self) -> NetConfig {
        match (self.residual_blocks, self.hidden.first()) {
            (blocks, Some(&hidden)) if blocks > 0 => NetConfig::Residual {
                hidden,
                blocks,
                activation: self.activation,
            },
            _ => NetConfig::Mlp {
                hidden: self.hidden.clone(),
                activation: self.activation,
            },
        }
    }

    /// The widths of the network's hidden layers, one per masked layer but the last.
    fn hidden_widths(&self) -> Vec<usize> {
        match (self.residual_blocks, self.hidden.first()) {
            (blocks, Some(&h)) if blocks > 0 => vec![h; 1 + 2 * blocks],
            _ => self.hidden.clone(),
        }
    }

    /// The network's layers' names under `made` (as [`Mlp`] stores them).
    fn layer_names(&self) -> Vec<String> {
        if self.residual_blocks > 0 {
            std::iter::once("input".to_string())
                .chain(
                    (0..self.residual_blocks)
                        .flat_map(|b| [format!("blocks.{b}.0"), format!("blocks.{b}.1")]),
                )
                .chain(std::iter::once("output".to_string()))
                .collect()
        } else {
            (0..=self.hidden.len())
                .map(|i| (2 * i).to_string())
                .collect()
        }
    }
}

impl<T: Transform> LayerConfig for AutoregressiveConfig<T> {
    /// The order and widths against `dim` features, the context and the transform's
    /// settings.
    fn check(&self, dim: usize, context_dim: usize) -> std::result::Result<(), String> {
        // The transform first: its settings (a spline's bins) size the network's output.
        self.transform.check()?;
        AutoregressiveConfig::check(self, dim)?;
        check_context(self.context_dim, context_dim)
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
        Ok(oriented(Autoregressive::new(self, vb)?, self.inverted))
    }
}

/// An autoregressive layer (MAF, and with a spline, autoregressive NSF): a MADE network
/// reads all features `x` (and the context) and outputs the parameters of each feature's
/// element-wise [`Transform`] from the features before it in the order alone, so
/// - forward (data → latent, the density): `z = f(x; θ(x))` in one pass;
/// - inverse: `x = f⁻¹(z; θ(x))`, feature by feature: `d` passes.
///
/// The MADE network is stored under `made.*` (as a plain MLP: `made.0`, `made.2`, …, or
/// a residual one: `made.input`, `made.blocks.{b}.{0,1}`, `made.output`); its masks
/// follow from the order and are not stored, unless the configuration says they are
/// (`made.{layer}.mask`).
#[derive(Debug, Clone)]
pub struct Autoregressive<T> {
    made: Mlp,
    transform: T,
    dim: usize,
    /// `0..dim`: every feature is mapped.
    features: Vec<usize>,
    context_dim: usize,
    /// Stored masks: the layer's buffers.
    stored: Vec<Tensor>,
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
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let made = Mlp::new(
            &cfg.net(),
            dim + cfg.context_dim,
            dim * params,
            cfg.zero_init,
            vb.pp("made"),
        )?;
        let widths = cfg.hidden_widths();
        let mut masks = made_masks(&rank, cfg.context_dim, &widths, params, &device)?
            .into_iter()
            .map(|m| m.to_dtype(dtype))
            .collect::<Result<Vec<_>>>()?;
        let mut stored = Vec::new();
        if cfg.stored_masks {
            for (name, computed) in cfg.layer_names().iter().zip(&masks) {
                let vb = vb.pp("made").pp(name);
                let fresh = !vb.contains_tensor("mask");
                let mask = vb.get_with_hints(computed.dims(), "mask", Init::Const(0.0))?;
                if fresh {
                    // A new layer starts from the masks its order gives (written into the
                    // variable just created, so that it is saved with them).
                    mask.slice_set(computed, 0, 0)?;
                }
                stored.push(mask);
            }
            check_made_masks(&stored, &rank, cfg.context_dim, params, cfg.residual_blocks)?;
            masks = stored.clone();
        }
        Ok(Self {
            made: made.with_masks(masks)?,
            transform: cfg.transform.clone(),
            dim,
            features: (0..dim).collect(),
            context_dim: cfg.context_dim,
            stored,
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
        self.step(x, &theta, false)
    }

    /// The transform over every feature: its kernel or its reference.
    fn step(&self, x: &Tensor, theta: &[Tensor], inverse: bool) -> Result<(Tensor, Tensor)> {
        let features = Features::All {
            indices: &self.features,
        };
        apply_transform(&self.transform, x, features, theta, inverse)
    }

    /// `d` passes: after pass `k` the first `k + 1` features of the order are exact.
    fn inverse_pass(&self, z: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let mut x = z.zeros_like()?;
        let mut log_det = None;
        for _ in 0..self.dim {
            let theta = self.params(&x, context)?;
            let (next, ld) = self.step(z, &theta, true)?;
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
    /// Stored masks are fixed: training must not make the network see the future.
    fn buffers(&self) -> Vec<Tensor> {
        self.stored.clone()
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
