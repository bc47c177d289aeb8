use candle::{bail, Result, Tensor};
use candle_nn::{init::Init, Linear, Module, VarBuilder};
use flow_core::limits;
use flow_kernels::{fused, mlp::Arch, Op};
use serde::{Deserialize, Serialize};

use crate::Activation;

/// Architecture of a conditioner network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum NetConfig {
    /// `Linear → act → … → Linear` with the given hidden widths. Linear `i` is stored
    /// under `{2i}` (the indices of a PyTorch `Sequential` that interleaves activations).
    Mlp {
        hidden: Vec<usize>,
        activation: Activation,
    },
    /// `Linear(in, h)`, then `blocks` residual blocks `u + L₁(act(L₀(act(u))))`, then
    /// `Linear(h, out)`. Stored under `input`, `blocks.{b}.{0,1}` and `output`.
    Residual {
        hidden: usize,
        blocks: usize,
        activation: Activation,
    },
}

impl NetConfig {
    pub fn activation(&self) -> Activation {
        match self {
            Self::Mlp { activation, .. } | Self::Residual { activation, .. } => *activation,
        }
    }

    /// Checks the sizes of a network from `inputs` to `outputs` features before any
    /// weight is made: no hidden layer of width 0, and every width and weight matrix
    /// within [`flow_core::limits`].
    pub fn check(&self, inputs: usize, outputs: usize) -> std::result::Result<(), String> {
        let hidden = match self {
            Self::Mlp { hidden, .. } => hidden.clone(),
            Self::Residual { hidden, blocks, .. } => {
                limits::checked_product(
                    "a residual network's blocks",
                    &[*blocks, *hidden, *hidden],
                    limits::MAX_TENSOR_ELEMENTS,
                )?;
                vec![*hidden]
            }
        };
        if hidden.contains(&0) {
            return Err("a hidden layer of width 0".into());
        }
        let widths: Vec<usize> = std::iter::once(inputs)
            .chain(hidden)
            .chain(std::iter::once(outputs))
            .collect();
        limits::check_dense(&widths)
    }
}

/// A conditioner network: `(batch, in) → (batch, out)`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Plain: every layer in order. Residual: input, the two layers of each block, output.
    layers: Vec<Linear>,
    residual: bool,
    activation: Activation,
    /// A masked network's (MADE's) 0/1 masks, one per layer, `(out, in)`: the
    /// weights used are `W ⊙ M`.
    masks: Option<Vec<Tensor>>,
}

/// A `Linear(in, out)` initialised like PyTorch's (`U(±1/√in)` for weight and bias), or
/// with zeros when `zero` is set.
fn linear(in_dim: usize, out_dim: usize, zero: bool, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let init = if zero {
        Init::Const(0.0)
    } else {
        Init::Uniform {
            lo: -bound,
            up: bound,
        }
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = vb.get_with_hints(out_dim, "bias", init)?;
    Ok(Linear::new(weight, Some(bias)))
}

impl Mlp {
    /// Builds the network; with `zero_last` the output layer starts at zero, so a
    /// coupling layer using it starts as the identity.
    pub fn new(
        cfg: &NetConfig,
        in_dim: usize,
        out_dim: usize,
        zero_last: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        match cfg {
            NetConfig::Mlp { hidden, activation } => {
                let widths: Vec<usize> = std::iter::once(in_dim)
                    .chain(hidden.iter().copied())
                    .chain(std::iter::once(out_dim))
                    .collect();
                let n = widths.len() - 1;
                let layers = (0..n)
                    .map(|i| {
                        let last = i + 1 == n;
                        linear(widths[i], widths[i + 1], zero_last && last, vb.pp(2 * i))
                    })
                    .collect::<Result<_>>()?;
                Ok(Self {
                    layers,
                    residual: false,
                    activation: *activation,
                    masks: None,
                })
            }
            NetConfig::Residual {
                hidden,
                blocks,
                activation,
            } => {
                let h = *hidden;
                let mut layers = vec![linear(in_dim, h, false, vb.pp("input"))?];
                for b in 0..*blocks {
                    let vb = vb.pp("blocks").pp(b);
                    layers.push(linear(h, h, false, vb.pp(0))?);
                    layers.push(linear(h, h, false, vb.pp(1))?);
                }
                layers.push(linear(h, out_dim, zero_last, vb.pp("output"))?);
                Ok(Self {
                    layers,
                    residual: true,
                    activation: *activation,
                    masks: None,
                })
            }
        }
    }

    pub fn layers(&self) -> &[Linear] {
        &self.layers
    }

    /// The non-linearity between layers.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Whether the network is plain and unmasked: its layers' weights are the ones
    /// applied, one after the other.
    pub fn is_plain(&self) -> bool {
        !self.residual && self.masks.is_none()
    }

    /// The network with its layers' weights masked (MADE): `masks[l]` `(out, in)` of
    /// 0/1 values for layer `l`, on the network's device and dtype.
    pub fn with_masks(mut self, masks: Vec<Tensor>) -> Result<Self> {
        if masks.len() != self.layers.len() {
            bail!(
                "{} masks for a network of {} layers",
                masks.len(),
                self.layers.len()
            );
        }
        for (m, l) in masks.iter().zip(&self.layers) {
            if m.dims() != l.weight().dims() {
                bail!("mask {:?} for weights {:?}", m.dims(), l.weight().dims());
            }
        }
        self.masks = Some(masks);
        Ok(self)
    }

    /// The layers as computed: masked weights where the network is masked.
    fn effective(&self) -> Result<Vec<Linear>> {
        match &self.masks {
            None => Ok(self.layers.clone()),
            Some(masks) => self
                .layers
                .iter()
                .zip(masks)
                .map(|(l, m)| Ok(Linear::new((l.weight() * m)?, l.bias().cloned())))
                .collect(),
        }
    }
}

impl Mlp {
    /// Whether [`forward`](Module::forward) takes a fused kernel for `x` (decided by
    /// [`flow_kernels::fused`]).
    pub fn uses_fused(&self, x: &Tensor) -> bool {
        let op = Op::Mlp {
            activation: self.activation,
        };
        fused(op, x) && self.layers.iter().all(|l| l.bias().is_some())
    }

    /// The network's shape as the kernels see it.
    fn arch(&self) -> Result<Arch> {
        let out = |l: &Linear| l.weight().dims()[0];
        let inp = |l: &Linear| l.weight().dims()[1];
        let (Some(first), Some(last)) = (self.layers.first(), self.layers.last()) else {
            bail!("empty network");
        };
        Ok(if self.residual {
            Arch::Residual {
                input: inp(first),
                hidden: out(first),
                blocks: (self.layers.len() - 2) / 2,
                output: out(last),
            }
        } else {
            let widths = std::iter::once(inp(first))
                .chain(self.layers.iter().map(out))
                .collect();
            Arch::Plain { widths }
        })
    }

    /// Several networks over the same input `x`, one output each: as one op where
    /// [`runs_as_one_op`](Self::runs_as_one_op) says so, otherwise each through its own
    /// [`forward`](Module::forward).
    pub fn forward_all(nets: &[Mlp], x: &Tensor) -> Result<Vec<Tensor>> {
        let [first, ..] = nets else {
            return Ok(Vec::new());
        };
        if !Self::runs_as_one_op(nets, x)? {
            return nets.iter().map(|n| n.forward(x)).collect();
        }
        let effective = nets
            .iter()
            .map(Mlp::effective)
            .collect::<Result<Vec<_>>>()?;
        let layers = effective
            .iter()
            .map(|layers| with_biases(layers))
            .collect::<Result<Vec<_>>>()?;
        flow_kernels::mlp::forward_many(x, &layers, &first.arch()?, first.activation)
    }

    /// The one place that groups networks: whether `nets` over `x` run as one op.
    /// They do when all take the fused kernel, share one shape and activation, and
    /// [`flow_kernels::mlp::runs_many`] says the CPU runs that many side by side.
    pub fn runs_as_one_op(nets: &[Mlp], x: &Tensor) -> Result<bool> {
        let [first, rest @ ..] = nets else {
            return Ok(false);
        };
        if rest.is_empty() || !first.uses_fused(x) {
            return Ok(false);
        }
        let arch = first.arch()?;
        for n in rest {
            if n.activation != first.activation || !n.uses_fused(x) || n.arch()? != arch {
                return Ok(false);
            }
        }
        Ok(flow_kernels::mlp::runs_many(x, &arch, nets.len()))
    }

    fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        let effective = self.effective()?;
        let layers = with_biases(&effective)?;
        flow_kernels::mlp::forward(x, &layers, &self.arch()?, self.activation)
    }

    /// The network built from plain candle ops: the reference the fused kernel is
    /// tested against.
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        let act = self.activation;
        let effective = self.effective()?;
        let Some((last, rest)) = effective.split_last() else {
            bail!("empty network");
        };
        if !self.residual {
            let mut h = x.clone();
            for layer in rest {
                h = act.apply(&layer.forward(&h)?)?;
            }
            return last.forward(&h);
        }
        let Some((first, blocks)) = rest.split_first() else {
            bail!("residual network without an input layer");
        };
        let mut h = first.forward(x)?;
        for pair in blocks.chunks_exact(2) {
            let u = pair[0].forward(&act.apply(&h)?)?;
            let u = pair[1].forward(&act.apply(&u)?)?;
            h = (h + u)?;
        }
        last.forward(&h)
    }
}

/// `(weight, bias)` of each layer, as the fused kernels take them.
fn with_biases(layers: &[Linear]) -> Result<Vec<(&Tensor, &Tensor)>> {
    layers
        .iter()
        .map(|l| match l.bias() {
            Some(b) => Ok((l.weight(), b)),
            None => bail!("fused networks need biases"),
        })
        .collect()
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.uses_fused(x) {
            self.forward_fused(x)
        } else {
            self.forward_reference(x)
        }
    }
}
