use candle::{bail, Device, Result, Tensor};

/// Which features a coupling layer keeps (conditions on) and which it transforms.
///
/// `kept[j] == true` keeps feature `j`. Contiguous selections are read with `narrow`,
/// others with a gather.
#[derive(Debug, Clone)]
pub struct Mask {
    kept: Vec<bool>,
    keep_idx: Vec<usize>,
    transform_idx: Vec<usize>,
    gather_keep: Tensor,
    gather_transform: Tensor,
    /// Gathers `[kept | transformed]` back into feature order.
    scatter: Tensor,
}

fn contiguous(idx: &[usize]) -> Option<usize> {
    let start = *idx.first()?;
    idx.iter()
        .enumerate()
        .all(|(i, &j)| j == start + i)
        .then_some(start)
}

fn index_tensor(idx: &[usize], device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    Tensor::new(v.as_slice(), device)
}

impl Mask {
    /// `kept[j]` keeps feature `j`; at least one feature must be kept and one transformed.
    pub fn new(kept: Vec<bool>, device: &Device) -> Result<Self> {
        let keep_idx: Vec<usize> = (0..kept.len()).filter(|&j| kept[j]).collect();
        let transform_idx: Vec<usize> = (0..kept.len()).filter(|&j| !kept[j]).collect();
        if keep_idx.is_empty() || transform_idx.is_empty() {
            bail!("a coupling mask must keep at least one feature and transform at least one, got {kept:?}");
        }
        let order: Vec<usize> = keep_idx.iter().chain(&transform_idx).copied().collect();
        let mut inverse = vec![0; order.len()];
        for (pos, &j) in order.iter().enumerate() {
            inverse[j] = pos;
        }
        Ok(Self {
            gather_keep: index_tensor(&keep_idx, device)?,
            gather_transform: index_tensor(&transform_idx, device)?,
            scatter: index_tensor(&inverse, device)?,
            kept,
            keep_idx,
            transform_idx,
        })
    }

    /// Keeps the first `k` of `dim` features (`flip = false`) or transforms them
    /// (`flip = true`).
    pub fn split(dim: usize, k: usize, flip: bool, device: &Device) -> Result<Self> {
        Self::new((0..dim).map(|j| (j < k) != flip).collect(), device)
    }

    /// Keeps features of even index (`parity = 0`) or odd index (`parity = 1`).
    pub fn checkerboard(dim: usize, parity: usize, device: &Device) -> Result<Self> {
        Self::new((0..dim).map(|j| j % 2 == parity % 2).collect(), device)
    }

    pub fn kept(&self) -> &[bool] {
        &self.kept
    }

    pub fn dim(&self) -> usize {
        self.kept.len()
    }

    pub fn n_kept(&self) -> usize {
        self.keep_idx.len()
    }

    pub fn n_transformed(&self) -> usize {
        self.transform_idx.len()
    }

    fn gather(x: &Tensor, idx: &[usize], gather: &Tensor) -> Result<Tensor> {
        match contiguous(idx) {
            Some(start) => x.narrow(1, start, idx.len()),
            None => x.index_select(gather, 1),
        }
    }

    /// The transformed features' indices, in order.
    pub fn transformed(&self) -> &[usize] {
        &self.transform_idx
    }

    fn check_width(&self, x: &Tensor) -> Result<()> {
        if x.dim(1)? != self.dim() {
            bail!(
                "coupling layer over {} features applied to {}",
                self.dim(),
                x.dim(1)?
            );
        }
        Ok(())
    }

    /// The kept features `(batch, n_kept)` of `x: (batch, dim)`.
    pub fn kept_input(&self, x: &Tensor) -> Result<Tensor> {
        self.check_width(x)?;
        Self::gather(x, &self.keep_idx, &self.gather_keep)
    }

    /// The transformed features `(batch, n_transformed)` of `x: (batch, dim)`.
    pub fn transformed_input(&self, x: &Tensor) -> Result<Tensor> {
        self.check_width(x)?;
        Self::gather(x, &self.transform_idx, &self.gather_transform)
    }

    /// Splits `x: (batch, dim)` into the kept `(batch, n_kept)` and transformed
    /// `(batch, n_transformed)` features.
    pub fn split_input(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.kept_input(x)?, self.transformed_input(x)?))
    }

    /// Inverse of [`split_input`](Self::split_input).
    pub fn merge(&self, kept: &Tensor, transformed: &Tensor) -> Result<Tensor> {
        if contiguous(&self.keep_idx) == Some(0) {
            Tensor::cat(&[kept, transformed], 1)
        } else if contiguous(&self.transform_idx) == Some(0) {
            Tensor::cat(&[transformed, kept], 1)
        } else {
            Tensor::cat(&[kept, transformed], 1)?.index_select(&self.scatter, 1)
        }
    }
}
