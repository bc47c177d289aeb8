use candle::{bail, Result, Tensor};
use candle_nn::{Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Mlp, NetConfig};

/// Whether a transform's parameters come from one network each or from one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Nets {
    /// One network per parameter (for RealNVP, `s` and `t`: the original code's
    /// `sig_net` / `mu_net`).
    #[default]
    Separate,
    /// One network `net` whose output holds them all, arranged as [`OutputLayout`] says.
    Joint,
}

/// How a joint network's `P·n` outputs hold `P` parameters for each of `n` features.
/// The names are an affine transform's (parameters `s`, `t`); for other transforms read
/// "the transform's parameter order" for `[s | t]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OutputLayout {
    /// One block of `n` columns per parameter, in the transform's order: `[s | t]`.
    #[default]
    ScaleShift,
    /// The blocks in reverse order: `[t | s]`.
    ShiftScale,
    /// Feature by feature, the parameters in reverse order: `t₀, s₀, t₁, s₁, …`.
    Interleaved,
    /// Feature by feature, the parameters in the transform's order (nflows' and zuko's
    /// layout for splines).
    ByFeature,
}

/// The networks of a coupling layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditionerConfig {
    #[serde(default)]
    pub nets: Nets,
    #[serde(default)]
    pub layout: OutputLayout,
    pub net: NetConfig,
    /// Start the output layer at zero, so the coupling starts as the identity.
    #[serde(default)]
    pub zero_init: bool,
}

/// Computes a coupling's transform parameters from its kept features (and context):
/// `P` parameters for each of `n` transformed features, as `P` tensors `(batch, n)`.
///
/// With separate networks, parameter `p` comes from its own network stored under the
/// parameter's name (`s.*` and `t.*` for an affine transform); a joint network `net`
/// has `P·n` outputs, arranged as [`OutputLayout`] says.
#[derive(Debug, Clone)]
pub enum Conditioner {
    Separate(Vec<Mlp>),
    Joint {
        net: Mlp,
        layout: OutputLayout,
        params: usize,
    },
}

impl Conditioner {
    /// `in_dim` inputs (kept features and context), `out_dim` transformed features,
    /// and the transform's parameter `names` (one network each when separate).
    pub fn new(
        cfg: &ConditionerConfig,
        in_dim: usize,
        out_dim: usize,
        names: &[String],
        vb: VarBuilder,
    ) -> Result<Self> {
        let zero = cfg.zero_init;
        Ok(match cfg.nets {
            Nets::Separate => Self::Separate(
                names
                    .iter()
                    .map(|name| Mlp::new(&cfg.net, in_dim, out_dim, zero, vb.pp(name)))
                    .collect::<Result<_>>()?,
            ),
            Nets::Joint => Self::Joint {
                net: Mlp::new(&cfg.net, in_dim, names.len() * out_dim, zero, vb.pp("net"))?,
                layout: cfg.layout,
                params: names.len(),
            },
        })
    }

    /// `h: (batch, in_dim)` → the parameters, each `(batch, n)`, in the transform's
    /// order.
    pub fn params(&self, h: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(nets) => {
                // Laid out once for every network (the fused kernels read it in place).
                let h = &h.contiguous()?;
                Mlp::forward_all(nets, h)
            }
            Self::Joint {
                net,
                layout,
                params,
            } => split(&net.forward(h)?, *layout, *params),
        }
    }

    /// `h: (batch, in_dim)` → the parameters stacked `(batch, n, P)`, in the
    /// transform's order.
    pub fn params_stacked(&self, h: &Tensor) -> Result<Tensor> {
        match self {
            Self::Joint {
                net,
                layout: OutputLayout::ByFeature,
                params,
            } => {
                let out = net.forward(h)?;
                let (b, w) = out.dims2()?;
                out.reshape((b, w / params, *params))
            }
            _ => Tensor::stack(&self.params(h)?, 2),
        }
    }
}

/// A joint network's output `(batch, p·n)` as `p` tensors `(batch, n)`.
fn split(out: &Tensor, layout: OutputLayout, p: usize) -> Result<Vec<Tensor>> {
    let (b, w) = out.dims2()?;
    if p == 0 || w % p != 0 {
        bail!("joint conditioner output of width {w} does not hold {p} parameters");
    }
    let n = w / p;
    let mut parts = match layout {
        OutputLayout::ScaleShift | OutputLayout::ShiftScale => (0..p)
            .map(|k| out.narrow(1, k * n, n))
            .collect::<Result<Vec<_>>>()?,
        OutputLayout::Interleaved | OutputLayout::ByFeature => {
            let grouped = out.reshape((b, n, p))?;
            (0..p)
                .map(|k| grouped.narrow(2, k, 1)?.reshape((b, n)))
                .collect::<Result<Vec<_>>>()?
        }
    };
    // `ShiftScale` and `Interleaved` hold the parameters in reverse order.
    if matches!(layout, OutputLayout::ShiftScale | OutputLayout::Interleaved) {
        parts.reverse();
    }
    Ok(parts)
}
