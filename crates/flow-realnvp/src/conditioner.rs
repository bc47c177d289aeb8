use candle::{bail, Result, Tensor};
use candle_nn::{Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Mlp, NetConfig};

/// Whether the log-scale and the shift come from two networks or one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Nets {
    /// Two networks `s` and `t` (the original RealNVP code's `sig_net` / `mu_net`).
    #[default]
    Separate,
    /// One network `net` whose output holds both, arranged as [`OutputLayout`] says.
    Joint,
}

/// How a joint network's `2·n` outputs split into log-scale and shift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OutputLayout {
    /// `[s | t]`: first `n` columns scale, last `n` shift.
    #[default]
    ScaleShift,
    /// `[t | s]`.
    ShiftScale,
    /// `t₀, s₀, t₁, s₁, …`: shift in even columns, scale in odd ones.
    Interleaved,
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

/// Computes the raw log-scale and the shift of a coupling layer from its kept features.
#[derive(Debug, Clone)]
pub enum Conditioner {
    /// Networks `s` (absent for additive couplings) and `t`.
    Separate { s: Option<Mlp>, t: Mlp },
    /// One network with `2·n` outputs (`n` for additive couplings).
    Joint {
        net: Mlp,
        layout: OutputLayout,
        affine: bool,
    },
}

impl Conditioner {
    /// `in_dim` inputs (kept features and context), `out_dim` transformed features;
    /// `affine = false` produces a shift only.
    pub fn new(
        cfg: &ConditionerConfig,
        in_dim: usize,
        out_dim: usize,
        affine: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let zero = cfg.zero_init;
        Ok(match cfg.nets {
            Nets::Separate => Self::Separate {
                s: affine
                    .then(|| Mlp::new(&cfg.net, in_dim, out_dim, zero, vb.pp("s")))
                    .transpose()?,
                t: Mlp::new(&cfg.net, in_dim, out_dim, zero, vb.pp("t"))?,
            },
            Nets::Joint => {
                let width = if affine { 2 * out_dim } else { out_dim };
                Self::Joint {
                    net: Mlp::new(&cfg.net, in_dim, width, zero, vb.pp("net"))?,
                    layout: cfg.layout,
                    affine,
                }
            }
        })
    }

    /// `h: (batch, in_dim)` → (raw log-scale `(batch, n)` if affine, shift `(batch, n)`).
    pub fn params(&self, h: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        match self {
            Self::Separate { s, t } => {
                // Laid out once for both networks (the fused kernels read it in place).
                let h = &h.contiguous()?;
                let s = s.as_ref().map(|s| s.forward(h)).transpose()?;
                Ok((s, t.forward(h)?))
            }
            Self::Joint {
                net, affine: false, ..
            } => Ok((None, net.forward(h)?)),
            Self::Joint { net, layout, .. } => {
                let out = net.forward(h)?;
                let (b, w) = out.dims2()?;
                if w % 2 != 0 {
                    bail!("joint conditioner output has odd width {w}");
                }
                let n = w / 2;
                let (s, t) = match layout {
                    OutputLayout::ScaleShift => (out.narrow(1, 0, n)?, out.narrow(1, n, n)?),
                    OutputLayout::ShiftScale => (out.narrow(1, n, n)?, out.narrow(1, 0, n)?),
                    OutputLayout::Interleaved => {
                        let pairs = out.reshape((b, n, 2))?;
                        (
                            pairs.narrow(2, 1, 1)?.reshape((b, n))?,
                            pairs.narrow(2, 0, 1)?.reshape((b, n))?,
                        )
                    }
                };
                Ok((Some(s), t))
            }
        }
    }
}
