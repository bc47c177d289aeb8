//! The last check before a model is written: that it evaluates.

use std::path::Path;

use candle::{DType, Device, Tensor};
use flow_core::Flow;
use rand::{rngs::StdRng, SeedableRng};

use crate::IoError;

/// Points drawn to score a model: enough to meet every layer, few enough to be quick.
const POINTS: usize = 4;

/// Checks that `flow` (read from `path`) draws finite samples and scores them finite:
/// tensors that are finite one by one can still make a model that is not (a scale that
/// overflows, weights for other settings). A conditional flow (`context_dim` features)
/// is scored at a zero context. The draw is seeded, so the check is the same on every
/// run.
pub fn check_scores(path: &Path, flow: &Flow, context_dim: usize) -> Result<(), IoError> {
    let invalid = |message: String| IoError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let context = (context_dim > 0)
        .then(|| Tensor::zeros((1, context_dim), DType::F32, &Device::Cpu))
        .transpose()
        .map_err(IoError::candle(path))?;
    let context = context.as_ref();
    let mut rng = StdRng::seed_from_u64(0);
    let x = flow
        .sample_with_context(POINTS, 1.0, context, &mut rng)
        .map_err(IoError::candle(path))?;
    let log_p = flow
        .log_prob_with_context(&x, context)
        .map_err(IoError::candle(path))?;
    let values = |t: &Tensor| {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(IoError::candle(path))
    };
    if values(&x)?.iter().any(|v| !v.is_finite()) {
        return Err(invalid(
            "the model draws samples that are not finite: its weights do not make a working flow"
                .into(),
        ));
    }
    if let Some(v) = values(&log_p)?.into_iter().find(|v| !v.is_finite()) {
        return Err(invalid(format!(
            "the model scores its own samples' log-density {v}: its weights do not make a working flow"
        )));
    }
    Ok(())
}
