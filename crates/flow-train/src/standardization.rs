//! The statistics a model's standardisations take from its training data.

use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::{Bijector, Bounded};
use flow_models::ModelConfig;

use crate::data::{Dataset, Moments};

/// Per-column mean and (population) standard deviation of rows of `width` values;
/// constant columns get 1 (as a streamed file's [`Moments`] give them).
pub(crate) fn moments(values: &[f32], width: usize) -> (Vec<f32>, Vec<f32>) {
    let mut m = Moments::new(values.len() / width.max(1), width);
    m.add_to_mean(values);
    m.add_to_variance(values);
    m.finish()
}

/// The data as the model's standardisation sees them: through its bounds' logit map
/// first, when it has one.
fn standardized_input(model: &ModelConfig, data: &Dataset) -> candle::Result<Vec<f32>> {
    let Some(bounds) = model.mapped_bounds() else {
        return Ok(data.values.clone());
    };
    let device = Device::Cpu;
    let bounded = Bounded::new(bounds, DType::F64, &device)?;
    let x = data.to_tensor(&device)?.to_dtype(DType::F64)?;
    let (y, _) = bounded.forward(&x)?;
    y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// Sets `{prefix}.mean` and `{prefix}.std` in `varmap` to `(mean, std)`, creating
/// them through `vb` so that the names are registered.
pub(crate) fn set_pair(
    varmap: &mut VarMap,
    vb: &candle_nn::VarBuilder,
    prefix: &str,
    (mean, std): (Vec<f32>, Vec<f32>),
) -> candle::Result<()> {
    let vb = vb.pp(prefix);
    let (device, dtype) = (vb.device().clone(), vb.dtype());
    let mean = Tensor::new(mean.as_slice(), &device)?.to_dtype(dtype)?;
    let std = Tensor::new(std.as_slice(), &device)?.to_dtype(dtype)?;
    vb.get_with_hints(mean.dims(), "mean", candle_nn::init::ZERO)?;
    vb.get_with_hints(std.dims(), "std", candle_nn::init::ONE)?;
    varmap.set_one(format!("{prefix}.mean"), &mean)?;
    varmap.set_one(format!("{prefix}.std"), &std)
}

/// Sets the statistics of `model`'s standardisations from `train`: those of the data
/// (after the bounds' logit map, if any) and of the context.
pub(crate) fn set_statistics(
    model: &ModelConfig,
    train: &Dataset,
    varmap: &mut VarMap,
    vb: &candle_nn::VarBuilder,
) -> candle::Result<()> {
    if model.standardize {
        let values = standardized_input(model, train)?;
        set_pair(varmap, vb, "standardize", moments(&values, train.dim))?;
    }
    if model.standardize_context {
        let stats = moments(&train.context, train.context_dim);
        set_pair(varmap, vb, "context_standardize", stats)?;
    }
    Ok(())
}
