//! zuko: `zuko.flows.RealNVP`, `NSF` and `MAF`, layers `transform.transforms.{t}`;
//! data → latent; base `N(base.loc, diag(base.scale)²)`, fixed. ReLU networks
//! `hyper.{0,2,4,…}`.
//!
//! - RealNVP: a boolean `mask` (true = kept) and an MLP whose output holds, per
//!   transformed feature, `(shift, a)`; log-scale `a / (1 + |a / ln(1e-3)|)`.
//! - MAF and NSF (`MaskedAutoregressiveTransform`): an integer `order` (the rank of each
//!   feature: feature `i` sees feature `j` where `order[j] < order[i]`) and a
//!   `MaskedMLP` whose layers hold a boolean `mask` `(out, in)` beside weight and bias.
//!   Its output holds each feature's parameters in turn: MAF's
//!   `MonotonicAffineTransform` `(shift, a)` as above; NSF's `MonotonicRQSTransform`
//!   `K` widths, `K` heights, `K − 1` derivatives (bound 5, slope 1e-3: zuko's spline
//!   style). Two parameters per feature are taken for MAF (NSF with one bin would be
//!   the same shape).

use std::collections::HashMap;

use candle::Tensor;
use flow_models::BaseConfig;
use flow_nn::{Activation, Affine, NetConfig, Nets, OutputLayout, ScaleMap};
use flow_nn::{Spline, SplineStyle};

use super::{
    affine, autoregressive, model, nets, ImportOptions, Imported, LayerConfig, Source, Weights,
};
use crate::IoError;

/// Where zuko's flows keep their transforms.
pub(crate) const ROOT: &str = "transform.transforms";

/// `|ln(1e-3)|`: zuko's default affine slope bound, as a log-scale clamp.
pub(crate) const DEFAULT_CLAMP: f64 = 6.907_755_278_982_137;

pub(crate) fn import(w: &mut Weights, opts: &ImportOptions) -> Result<Imported, IoError> {
    let root = ROOT;
    let ids = w.children(root);
    if ids.is_empty() {
        return Err(w.invalid("no `transform.transforms.{t}` tensors: not a zuko flow"));
    }
    if let Some(gap) = (0..ids.len()).find(|&i| ids[i] != i) {
        return Err(w.invalid(format!(
            "no `{root}.{gap}.*` tensors, but transforms up to {}",
            ids.last().copied().unwrap_or(0)
        )));
    }
    let activation = opts.activation.unwrap_or(Source::Zuko.default_activation());
    let clamp = opts.clamp.unwrap_or(DEFAULT_CLAMP);
    let mut tensors = HashMap::new();
    let mut layers = Vec::new();
    let mut dim = None;
    // A first `AffineTransform` (`_0` the shift, `_1` the scale) standardises the data,
    // as `flow export --to zuko` writes a standardised model.
    let standardize = w.contains(&format!("{root}.0._0"));
    if standardize {
        let shift = w.float_any(&format!("{root}.0._0"))?;
        let d = shift.dim(0).map_err(IoError::candle(w.path()))?;
        let scale = w.float(&format!("{root}.0._1"), &[d])?;
        let std = scale.recip().map_err(IoError::candle(w.path()))?;
        let mean = shift
            .mul(&std)
            .and_then(|m| m.neg())
            .map_err(IoError::candle(w.path()))?;
        tensors.insert("standardize.mean".into(), mean);
        tensors.insert("standardize.std".into(), std);
        dim = Some(d);
    }
    for (n, t) in ids.into_iter().skip(usize::from(standardize)).enumerate() {
        let p = format!("{root}.{t}");
        let (layer, d, key) = if w.contains(&format!("{p}.mask")) {
            let (layer, d) = coupling(w, &p, n, activation, clamp, &mut tensors)?;
            (layer, d, "mask")
        } else if w.contains(&format!("{p}.order")) {
            let (layer, d) =
                masked_autoregressive(w, &p, n, activation, clamp, opts, &mut tensors)?;
            (layer, d, "order")
        } else {
            return Err(w.unsupported(
                &p,
                "only RealNVP couplings (`mask`) and masked autoregressive transforms (`order`) are supported",
            ));
        };
        if *dim.get_or_insert(d) != d {
            return Err(w.invalid(format!(
                "`{p}.{key}` is for {d} features, the first transform's for {}",
                dim.unwrap_or(0)
            )));
        }
        layers.push(layer);
    }
    let dim = dim.unwrap_or(0);
    let loc = w.float("base.loc", &[dim])?;
    let scale = w.float("base.scale", &[dim])?;
    let log_scale = scale.log().map_err(IoError::candle(w.path()))?;
    tensors.insert("base.loc".into(), loc);
    tensors.insert("base.log_scale".into(), log_scale);
    let config = model(dim, layers, BaseConfig::DiagNormal { trainable: false });
    Ok(Imported::new(config.with_standardize(standardize), tensors))
}

/// A RealNVP coupling at `p`, layer `n`; returns it and its dimension.
fn coupling(
    w: &mut Weights,
    p: &str,
    n: usize,
    activation: Activation,
    clamp: f64,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<(LayerConfig, usize), IoError> {
    let mask = w.bools(&format!("{p}.mask"))?;
    let d = mask.len();
    let kept = mask.iter().filter(|m| **m).count();
    let (net, in_dim, out_dim) = w.mlp(
        &format!("{p}.hyper"),
        &format!("layers.{n}.net"),
        activation,
        tensors,
    )?;
    if in_dim != kept || out_dim != 2 * (d - kept) {
        return Err(w.invalid(format!(
            "`{p}.hyper` maps {in_dim} → {out_dim}; with mask {mask:?} it must map {kept} → {}",
            2 * (d - kept)
        )));
    }
    let layer = affine(
        mask,
        Nets::Joint,
        OutputLayout::Interleaved,
        net,
        ScaleMap::SoftClamp { clamp },
        false,
    );
    Ok((layer, d))
}

/// A MAF or NSF transform at `p`, layer `n`; returns it and its dimension.
fn masked_autoregressive(
    w: &mut Weights,
    p: &str,
    n: usize,
    activation: Activation,
    clamp: f64,
    opts: &ImportOptions,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<(LayerConfig, usize), IoError> {
    let ranks = w.indices(&format!("{p}.order"))?;
    let d = ranks.len();
    // Our order lists the features by rank; features of equal rank (zuko's `passes`
    // below the dimension) do not see each other, so any order among them will do.
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by_key(|&f| ranks[f]);
    let to = format!("layers.{n}.made");
    let (net, in_dim, out_dim) = w.mlp(&format!("{p}.hyper"), &to, activation, tensors)?;
    let NetConfig::Mlp { hidden, .. } = net else {
        return Err(w.invalid(format!("`{p}.hyper` is not a plain network")));
    };
    if in_dim != d || d == 0 || out_dim % d != 0 {
        return Err(w.invalid(format!(
            "`{p}.hyper` maps {in_dim} → {out_dim}; over {d} features it must map {d} → a multiple of {d}"
        )));
    }
    // The masks, layer by layer, beside the weights (`made.{2i}.mask`).
    let layers = w.children(&format!("{p}.hyper"));
    let widths: Vec<usize> = std::iter::once(d)
        .chain(hidden.iter().copied())
        .chain(std::iter::once(out_dim))
        .collect();
    for (i, l) in layers.iter().enumerate() {
        let mask = w.mask(&format!("{p}.hyper.{l}.mask"), &[widths[i + 1], widths[i]])?;
        tensors.insert(format!("{to}.{}.mask", 2 * i), mask);
    }
    let per_feature = out_dim / d;
    let last = format!("{to}.{}", 2 * hidden.len());
    let layer = if per_feature == 2 {
        // zuko's (shift, a) per feature; ours is (s, t).
        let rows: Vec<usize> = (0..2 * d).map(|r| r ^ 1).collect();
        nets::permute_rows(w, tensors, &last, &rows)?;
        LayerConfig::AffineAutoregressive(autoregressive(
            order,
            hidden,
            0,
            activation,
            Affine::new(ScaleMap::SoftClamp { clamp }),
            false,
        ))
    } else {
        let bins = nets::spline_bins(w, per_feature, &format!("`{p}.hyper`"))?;
        let spline = Spline {
            bins,
            bound: opts
                .tail_bound
                .or(Source::Zuko.default_tail_bound())
                .unwrap_or_default(),
            style: SplineStyle::Zuko,
            min_derivative: 1e-3,
            ..Spline::default()
        };
        LayerConfig::SplineAutoregressive(autoregressive(
            order, hidden, 0, activation, spline, false,
        ))
    };
    Ok((layer, d))
}
