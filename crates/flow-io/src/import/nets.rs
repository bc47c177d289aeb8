//! Networks that nflows and normflows share (normflows carries a copy of nflows' code):
//! - `ResidualNet`: `initial_layer`, `blocks.{b}.linear_layers.{0,1}`, `final_layer`,
//!   computing `h = initial(x)`, `h += L₁(act(L₀(act(h))))` per block, `final(h)`;
//! - `MADE` with residual blocks (the default): the same layers as `MaskedLinear`s, each
//!   with a float `mask` `(out, in)` and integer `degrees` of its outputs; the final
//!   layer's outputs hold the parameters feature by feature and its `degrees` say which
//!   input feature each output belongs to (its degree, 1-based), i.e. the order.
//!
//! Both are read into this crate's residual network layout (`input`, `blocks.{b}.{0,1}`,
//! `output`), masks beside the weights (`….mask`).

use std::collections::HashMap;

use candle::Tensor;
use flow_nn::{Activation, NetConfig};

use super::Weights;
use crate::IoError;

/// A residual network's shape: hidden width and blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Residual {
    pub hidden: usize,
    pub blocks: usize,
    /// Width of the final layer's output.
    pub out: usize,
}

impl Residual {
    pub fn net(&self, activation: Activation) -> NetConfig {
        NetConfig::Residual {
            hidden: self.hidden,
            blocks: self.blocks,
            activation,
        }
    }
}

/// Reads a `ResidualNet` or a residual `MADE` under `net` (`in_dim` inputs), writing its
/// tensors under `to`; with `masks`, each layer's `mask` as well (and its `degrees`
/// marked read: they are derived from the masks).
pub(crate) fn residual(
    w: &mut Weights,
    net: &str,
    to: &str,
    in_dim: usize,
    masks: bool,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<Residual, IoError> {
    let prefix = format!("{net}.");
    for part in ["context_layer", "batch_norm", "preprocessing"] {
        if let Some(name) = w
            .names()
            .into_iter()
            .find(|k| k.starts_with(&prefix) && k.contains(part))
        {
            return Err(w.invalid(format!(
                "`{name}`: networks with a `{part}` (conditional, batch-normed or periodic flows) are not supported"
            )));
        }
    }
    let init = format!("{net}.initial_layer.weight");
    let shape = w.shape(&init)?;
    let [hidden, found_in] = shape[..] else {
        return Err(w.invalid(format!("`{init}` is not a Linear weight: shape {shape:?}")));
    };
    if found_in != in_dim {
        return Err(IoError::ShapeMismatch {
            path: w.path().to_path_buf(),
            name: init,
            expected: vec![hidden, in_dim],
            found: shape,
        });
    }
    let fin = format!("{net}.final_layer.weight");
    let out = match w.shape(&fin)?[..] {
        [o, _] => o,
        _ => return Err(w.invalid(format!("`{fin}` is not a Linear weight"))),
    };
    let mut linear =
        |w: &mut Weights, from: &str, to: &str, o: usize, i: usize| -> Result<(), IoError> {
            tensors.insert(
                format!("{to}.weight"),
                w.float(&format!("{from}.weight"), &[o, i])?,
            );
            tensors.insert(
                format!("{to}.bias"),
                w.float(&format!("{from}.bias"), &[o])?,
            );
            if masks {
                tensors.insert(
                    format!("{to}.mask"),
                    w.mask(&format!("{from}.mask"), &[o, i])?,
                );
                w.skip(&format!("{from}.degrees"));
            }
            Ok(())
        };
    linear(
        w,
        &format!("{net}.initial_layer"),
        &format!("{to}.input"),
        hidden,
        in_dim,
    )?;
    let blocks = w.children(&format!("{net}.blocks"));
    if blocks != (0..blocks.len()).collect::<Vec<_>>() {
        return Err(w.invalid(format!(
            "`{net}.blocks` are not numbered 0..{}",
            blocks.len()
        )));
    }
    for b in &blocks {
        let block = format!("{net}.blocks.{b}");
        if w.contains(&format!("{block}.linear.weight")) {
            return Err(w.unsupported(
                &block,
                "MADE without residual blocks (use_residual_blocks=False) is not supported",
            ));
        }
        for j in 0..2 {
            linear(
                w,
                &format!("{block}.linear_layers.{j}"),
                &format!("{to}.blocks.{b}.{j}"),
                hidden,
                hidden,
            )?;
        }
    }
    linear(
        w,
        &format!("{net}.final_layer"),
        &format!("{to}.output"),
        out,
        hidden,
    )?;
    Ok(Residual {
        hidden,
        blocks: blocks.len(),
        out,
    })
}

/// The order of a MADE's `dim` features from its final layer's `degrees` (`params`
/// outputs per feature, feature by feature): the features by increasing degree.
pub(crate) fn made_order(
    w: &mut Weights,
    net: &str,
    dim: usize,
    params: usize,
) -> Result<Vec<usize>, IoError> {
    let name = format!("{net}.final_layer.degrees");
    let degrees = w.indices(&name)?;
    let per_feature: Vec<usize> = degrees.iter().step_by(params.max(1)).copied().collect();
    let consistent = degrees.len() == dim * params
        && degrees
            .chunks(params.max(1))
            .all(|c| c.iter().all(|&v| v == c[0]));
    let mut sorted = per_feature.clone();
    sorted.sort_unstable();
    if !consistent || sorted != (1..=dim).collect::<Vec<_>>() {
        return Err(w.invalid(format!(
            "`{name}` does not give each of {dim} features its own degree for its {params} outputs"
        )));
    }
    let mut order: Vec<usize> = (0..dim).collect();
    order.sort_by_key(|&f| per_feature[f]);
    Ok(order)
}

/// Multiplies output rows of the Linear layer `{layer}.weight` / `.bias` in `tensors` by
/// `factors` (one per row).
pub(crate) fn scale_rows(
    w: &Weights,
    tensors: &mut HashMap<String, Tensor>,
    layer: &str,
    factors: &[f32],
) -> Result<(), IoError> {
    let f = Tensor::from_slice(factors, factors.len(), &candle::Device::Cpu)
        .map_err(IoError::candle(w.path()))?;
    for (name, column) in [("weight", true), ("bias", false)] {
        let key = format!("{layer}.{name}");
        let Some(t) = tensors.get(&key) else {
            return Err(w.invalid(format!("no `{key}` to rescale")));
        };
        let scaled = if column {
            t.broadcast_mul(&f.unsqueeze(1).map_err(IoError::candle(w.path()))?)
        } else {
            t.mul(&f)
        }
        .map_err(IoError::candle(w.path()))?;
        tensors.insert(key, scaled);
    }
    Ok(())
}

/// Reorders the output rows of `{layer}.weight`, `.bias` and `.mask` (where present) in
/// `tensors`: row `i` becomes the old row `rows[i]`.
pub(crate) fn permute_rows(
    w: &Weights,
    tensors: &mut HashMap<String, Tensor>,
    layer: &str,
    rows: &[usize],
) -> Result<(), IoError> {
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let idx = Tensor::from_vec(idx, rows.len(), &candle::Device::Cpu)
        .map_err(IoError::candle(w.path()))?;
    for name in ["weight", "bias", "mask"] {
        let key = format!("{layer}.{name}");
        if let Some(t) = tensors.get(&key) {
            let t = t.index_select(&idx, 0).map_err(IoError::candle(w.path()))?;
            tensors.insert(key, t);
        }
    }
    Ok(())
}

/// Spline bins from a network's `per_feature` outputs for each feature, with linear
/// tails (`3K − 1` parameters); `what` names the network for the error.
pub(crate) fn spline_bins(w: &Weights, per_feature: usize, what: &str) -> Result<usize, IoError> {
    match per_feature % 3 {
        2 => Ok(per_feature.div_ceil(3)),
        1 => Err(w.invalid(format!(
            "{what}: {per_feature} spline parameters per feature is a spline without linear tails (tails=None), which is not supported"
        ))),
        _ => Err(w.invalid(format!(
            "{what}: {per_feature} parameters per feature fit neither an affine transform (2) nor a spline with linear tails (3K − 1)"
        ))),
    }
}
