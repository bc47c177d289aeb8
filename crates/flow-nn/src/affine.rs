use candle::{bail, Result, Tensor};
use flow_kernels::{Op, ScaleMap};
use serde::{Deserialize, Serialize};

use crate::{Features, Transform};

/// The affine map `y = x ⊙ exp(ŝ) + t` (inverse `x = (y − t) ⊙ exp(−ŝ)`), with
/// `log|det| = Σ ŝ`, where `ŝ` is the raw parameter `s` through the [`ScaleMap`].
/// Parameters `s` then `t`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Affine {
    #[serde(default)]
    pub scale: ScaleMap,
}

impl Affine {
    pub fn new(scale: ScaleMap) -> Self {
        Self { scale }
    }
}

fn two(theta: &[Tensor]) -> Result<(&Tensor, &Tensor)> {
    match theta {
        [s, t] => Ok((s, t)),
        _ => bail!(
            "an affine transform takes 2 parameters, got {}",
            theta.len()
        ),
    }
}

impl Transform for Affine {
    fn params(&self) -> Vec<String> {
        ["s", "t"].map(String::from).to_vec()
    }

    fn apply(&self, x: &Tensor, theta: &[Tensor], inverse: bool) -> Result<(Tensor, Tensor)> {
        let (s, t) = two(theta)?;
        let s = self.scale.log_scale(s)?;
        if inverse {
            let y = x.sub(t)?.mul(&s.neg()?.exp()?)?;
            Ok((y, s.sum(1)?.neg()?))
        } else {
            let y = x.mul(&s.exp()?)?.add(t)?;
            Ok((y, s.sum(1)?))
        }
    }

    fn check(&self) -> std::result::Result<(), String> {
        let clamp = match self.scale {
            ScaleMap::SoftClamp { clamp } | ScaleMap::Tanh { clamp } | ScaleMap::Atan { clamp } => {
                clamp
            }
            ScaleMap::Exp | ScaleMap::Sigmoid | ScaleMap::Softplus => 1.0,
        };
        if !(clamp.is_finite() && clamp > 0.0) {
            return Err(format!("clamp must be positive, got {clamp}"));
        }
        Ok(())
    }

    fn kernel(&self) -> Option<Op> {
        Some(Op::AffineCoupling)
    }

    /// One op for the update of the mapped features (the others copied through) and
    /// one for the log-det, in place of the split, the reference's ops and the merge.
    fn apply_fused(
        &self,
        x: &Tensor,
        features: Features,
        theta: &[Tensor],
        inverse: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (s, t) = two(theta)?;
        flow_kernels::affine::coupling(x, features.indices(), s, t, self.scale, inverse)
    }
}
