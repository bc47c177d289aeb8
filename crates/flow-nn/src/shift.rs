use candle::{bail, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::Transform;

/// The shift `y = x + t` (NICE's additive coupling): volume preserving, log-det 0.
/// One parameter, `t`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Shift {}

impl Transform for Shift {
    fn params(&self) -> Vec<String> {
        ["t"].map(String::from).to_vec()
    }

    fn apply(&self, x: &Tensor, theta: &[Tensor], inverse: bool) -> Result<(Tensor, Tensor)> {
        let [t] = theta else {
            bail!("a shift takes 1 parameter, got {}", theta.len());
        };
        let y = if inverse { x.sub(t)? } else { x.add(t)? };
        let log_det = Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?;
        Ok((y, log_det))
    }
}
