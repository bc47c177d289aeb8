use candle::{bail, Device, Result, Tensor};

use super::{zero_log_det, Bijector};

/// A fixed permutation of features: `z[:, j] = x[:, perm[j]]`. Log-det 0.
#[derive(Debug, Clone)]
pub struct Permute {
    perm: Vec<usize>,
    forward_idx: Tensor,
    inverse_idx: Tensor,
}

impl Permute {
    /// `perm` must contain every index `0..perm.len()` exactly once.
    pub fn new(perm: Vec<usize>, device: &Device) -> Result<Self> {
        let n = perm.len();
        let mut inv = vec![usize::MAX; n];
        for (j, &p) in perm.iter().enumerate() {
            if p >= n || inv[p] != usize::MAX {
                bail!("not a permutation of 0..{n}: {perm:?}");
            }
            inv[p] = j;
        }
        let to_tensor = |v: &[usize]| {
            let v: Vec<u32> = v.iter().map(|&i| i as u32).collect();
            Tensor::new(v.as_slice(), device)
        };
        Ok(Self {
            forward_idx: to_tensor(&perm)?,
            inverse_idx: to_tensor(&inv)?,
            perm,
        })
    }

    pub fn perm(&self) -> &[usize] {
        &self.perm
    }

    fn apply(&self, x: &Tensor, idx: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = x.dim(1)?;
        if d != self.perm.len() {
            bail!("permutation of {} features applied to {d}", self.perm.len());
        }
        Ok((x.index_select(idx, 1)?, zero_log_det(x)?))
    }
}

impl Bijector for Permute {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(x, &self.forward_idx)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(z, &self.inverse_idx)
    }
}
