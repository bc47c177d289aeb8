//! Random draws made on the host, so that results are reproducible from a seed on every
//! device (candle's CPU generator cannot be seeded).

use candle::{DType, Device, Result, Tensor};
use rand::RngCore;
use rand_distr::{Distribution as _, StandardNormal};

/// `(rows, cols)` independent standard-normal draws.
pub fn randn(
    rows: usize,
    cols: usize,
    dtype: DType,
    device: &Device,
    rng: &mut dyn RngCore,
) -> Result<Tensor> {
    let values: Vec<f64> = (0..rows * cols)
        .map(|_| StandardNormal.sample(&mut *rng))
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}
