//! nflows: a `Flow` whose `_transform._transforms.{l}` are, data → noise:
//! - couplings (`SimpleRealNVP`'s `AffineCouplingTransform`,
//!   `PiecewiseRationalQuadraticCouplingTransform`): integer buffers
//!   `identity_features` (kept) and `transform_features`, and a `ResidualNet`
//!   `transform_net` (see `nets`). The affine coupling's output is
//!   `[shift | raw scale]` with `scale = sigmoid(raw + 2) + 1e-3`; the spline's holds each
//!   transformed feature's `K` widths, `K` heights and `K − 1` derivatives (linear tails,
//!   Durkan's parametrisation), widths and heights divided by `√hidden` before their
//!   softmax — a factor folded here into the final layer's rows;
//! - `MaskedPiecewiseRationalQuadraticAutoregressiveTransform` over a residual `MADE`
//!   `autoregressive_net` (see `nets`) whose output holds each feature's spline
//!   parameters (not rescaled). `MaskedAffineAutoregressiveTransform`'s MADE reads the
//!   same way, `(raw scale, shift)` per feature, the scale `softplus(raw) + 1e-3`
//!   (nflows 0.14);
//! - permutations (`ReversePermutation`, `RandomPermutation`): `_permutation`,
//!   `z = x[:, perm]`.
//!
//! ReLU networks; base `N(0, I)`. The spline's tail bound is a setting (default 1.0,
//! nflows' own).

use std::collections::HashMap;

use candle::Tensor;
use flow_models::BaseConfig;
use flow_nn::Spline;
use flow_nn::{Activation, Affine, Nets, OutputLayout, ScaleMap};

use super::{
    affine, autoregressive, model, nets, spline_coupling, ImportOptions, Imported, LayerConfig,
    Source, Weights,
};
use crate::IoError;

pub(crate) fn import(w: &mut Weights, opts: &ImportOptions) -> Result<Imported, IoError> {
    let root = "_transform._transforms";
    let ids = w.children(root);
    if ids.is_empty() {
        return Err(w.invalid("no `_transform._transforms.{l}` tensors: not an nflows flow"));
    }
    // Every transform has tensors: a gap is a layer missing.
    if let Some(gap) = (0..ids.len()).find(|&i| ids[i] != i) {
        return Err(w.invalid(format!(
            "no `{root}.{gap}.*` tensors, but layers up to {}",
            ids.last().copied().unwrap_or(0)
        )));
    }
    let activation = opts
        .activation
        .unwrap_or(Source::Nflows.default_activation());
    let bound = opts
        .tail_bound
        .or(Source::Nflows.default_tail_bound())
        .unwrap_or_default();
    let mut tensors = HashMap::new();
    let mut layers = Vec::new();
    let mut dim = None;
    for (n, l) in ids.into_iter().enumerate() {
        let p = format!("{root}.{l}");
        let made = format!("{p}.autoregressive_net");
        let (layer, d, key) = if w.contains(&format!("{p}._permutation")) {
            let perm = w.indices(&format!("{p}._permutation"))?;
            let d = perm.len();
            (LayerConfig::Permute { perm }, d, "_permutation")
        } else if w.contains(&format!("{p}.identity_features")) {
            let (layer, d) = coupling(w, &p, l, n, activation, bound, &mut tensors)?;
            (layer, d, "identity_features")
        } else if w.contains(&format!("{made}.initial_layer.weight")) {
            // nflows 0.14 scales by softplus(raw) + 1e-3 (normflows' copy of the class
            // keeps the older sigmoid(raw + 2) + 1e-3).
            let (layer, d) = masked_autoregressive(
                w,
                &p,
                n,
                activation,
                bound,
                ScaleMap::Softplus,
                &mut tensors,
            )?;
            (layer, d, "autoregressive_net.initial_layer.weight")
        } else {
            return Err(w.unsupported(
                &p,
                "only couplings, masked autoregressive transforms and permutations are supported (batch norm between layers is not)",
            ));
        };
        if *dim.get_or_insert(d) != d {
            return Err(w.invalid(format!(
                "`{p}.{key}` is for {d} features, the first layer's for {}",
                dim.unwrap_or(0)
            )));
        }
        layers.push(layer);
    }
    Ok(Imported::new(
        model(dim.unwrap_or(0), layers, BaseConfig::StandardNormal),
        tensors,
    ))
}

/// An affine or spline coupling at `p` (source layer `l`, our layer `n`); returns it
/// and its dimension.
pub(crate) fn coupling(
    w: &mut Weights,
    p: &str,
    l: usize,
    n: usize,
    activation: Activation,
    bound: f64,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<(LayerConfig, usize), IoError> {
    let keep = w.indices(&format!("{p}.identity_features"))?;
    let change = w.indices(&format!("{p}.transform_features"))?;
    let d = keep.len() + change.len();
    let mut mask = vec![None; d];
    for (j, kept) in keep
        .iter()
        .map(|&j| (j, true))
        .chain(change.iter().map(|&j| (j, false)))
    {
        match mask.get_mut(j) {
            Some(slot @ None) => *slot = Some(kept),
            _ => {
                return Err(w.invalid(format!(
                    "layer {l}: feature indices are not a partition of 0..{d}"
                )))
            }
        }
    }
    let sorted = |v: &[usize]| v.windows(2).all(|p| p[0] < p[1]);
    if !sorted(&keep) || !sorted(&change) || change.is_empty() {
        return Err(w.invalid(format!(
            "layer {l}: feature indices must be increasing, and some transformed"
        )));
    }
    let mask: Vec<bool> = mask.into_iter().map(|m| m.unwrap_or(false)).collect();
    let to = format!("layers.{n}.net");
    let net = format!("{p}.transform_net");
    let r = nets::residual(w, &net, &to, keep.len(), false, tensors)?;
    if r.out % change.len() != 0 {
        return Err(w.invalid(format!(
            "`{net}.final_layer` has {} outputs for {} transformed features",
            r.out,
            change.len()
        )));
    }
    let per_feature = r.out / change.len();
    if per_feature == 2 {
        let layer = affine(
            mask,
            Nets::Joint,
            OutputLayout::ShiftScale,
            r.net(activation),
            ScaleMap::Sigmoid,
            false,
        );
        return Ok((layer, d));
    }
    let bins = nets::spline_bins(w, per_feature, &format!("`{net}`"))?;
    // nflows divides each feature's raw widths and heights by √hidden before the
    // softmax; the same factor on those rows of the final layer does it in advance.
    let shrink = 1.0 / (r.hidden as f32).sqrt();
    let factors: Vec<f32> = (0..r.out)
        .map(|row| {
            if row % per_feature < 2 * bins {
                shrink
            } else {
                1.0
            }
        })
        .collect();
    nets::scale_rows(w, tensors, &format!("{to}.output"), &factors)?;
    let layer = spline_coupling(mask, r.net(activation), Spline::new(bins, bound));
    Ok((layer, d))
}

/// A masked affine (or spline) autoregressive transform at `p`, our layer `n`; returns
/// it and its dimension.
pub(crate) fn masked_autoregressive(
    w: &mut Weights,
    p: &str,
    n: usize,
    activation: Activation,
    bound: f64,
    scale: ScaleMap,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<(LayerConfig, usize), IoError> {
    let net = format!("{p}.autoregressive_net");
    let init = format!("{net}.initial_layer.weight");
    let d = match w.shape(&init)?[..] {
        [_, d] if d > 0 => d,
        ref s => return Err(w.invalid(format!("`{init}` has shape {s:?}"))),
    };
    let r = nets::residual(w, &net, &format!("layers.{n}.made"), d, true, tensors)?;
    if r.blocks == 0 {
        // Without blocks nflows' residual MADE is two Linear layers with no activation
        // between them, which a plain MADE is not.
        return Err(w.unsupported(&net, "a MADE without blocks is not supported"));
    }
    if r.out % d != 0 {
        return Err(w.invalid(format!(
            "`{net}.final_layer` has {} outputs for {d} features",
            r.out
        )));
    }
    let per_feature = r.out / d;
    let order = nets::made_order(w, &net, d, per_feature)?;
    let layer = if per_feature == 2 {
        // (raw scale, shift) per feature: our (s, t), with the source's scale map.
        LayerConfig::AffineAutoregressive(autoregressive(
            order,
            vec![r.hidden],
            r.blocks,
            activation,
            Affine::new(scale),
            false,
        ))
    } else {
        let bins = nets::spline_bins(w, per_feature, &format!("`{net}`"))?;
        LayerConfig::SplineAutoregressive(autoregressive(
            order,
            vec![r.hidden],
            r.blocks,
            activation,
            Spline::new(bins, bound),
            false,
        ))
    };
    Ok((layer, d))
}
