//! zuko: `zuko.flows.RealNVP`. Layers `transform.transforms.{t}` with a boolean
//! `mask` (true = kept) and an MLP `hyper.{0,2,4,…}` (ReLU) whose output holds, per
//! transformed feature, `(shift, a)`; log-scale `a / (1 + |a / ln(1e-3)|)`;
//! data → latent; base `N(base.loc, diag(base.scale)²)`, fixed.

use std::collections::HashMap;

use flow_models::BaseConfig;
use flow_realnvp::{Activation, Nets, OutputLayout, ScaleMap};

use super::{affine, model, ImportOptions, Imported, Weights};
use crate::IoError;

/// `|ln(1e-3)|`: zuko's default affine slope bound.
const ZUKO_BOUND: f64 = 6.907_755_278_982_137;

pub(crate) fn import(w: &mut Weights, opts: &ImportOptions) -> Result<Imported, IoError> {
    let root = "transform.transforms";
    let ids = w.children(root);
    if ids.is_empty() {
        return Err(w.invalid("no `transform.transforms.{t}` tensors: not a zuko flow"));
    }
    let activation = opts.activation.unwrap_or(Activation::Relu);
    let clamp = opts.clamp.unwrap_or(ZUKO_BOUND);
    let mut tensors = HashMap::new();
    let mut layers = Vec::new();
    let mut dim = None;
    for (n, t) in ids.into_iter().enumerate() {
        let p = format!("{root}.{t}");
        let mask = w.bools(&format!("{p}.mask"))?;
        let d = mask.len();
        if *dim.get_or_insert(d) != d {
            return Err(w.invalid(format!(
                "transform {t} works on {d} features, the first on {}",
                dim.unwrap_or(0)
            )));
        }
        let kept = mask.iter().filter(|m| **m).count();
        let (net, in_dim, out_dim) = w.mlp(
            &format!("{p}.hyper"),
            &format!("layers.{n}.net"),
            activation,
            &mut tensors,
        )?;
        if in_dim != kept || out_dim != 2 * (d - kept) {
            return Err(w.invalid(format!(
                "`{p}.hyper` maps {in_dim} → {out_dim}; with mask {mask:?} it must map {kept} → {}",
                2 * (d - kept)
            )));
        }
        layers.push(affine(
            mask,
            Nets::Joint,
            OutputLayout::Interleaved,
            net,
            ScaleMap::SoftClamp { clamp },
            false,
        ));
    }
    let dim = dim.unwrap_or(0);
    let loc = w.float("base.loc", &[dim])?;
    let scale = w.float("base.scale", &[dim])?;
    let log_scale = scale.log().map_err(IoError::candle(w.path()))?;
    tensors.insert("base.loc".into(), loc);
    tensors.insert("base.log_scale".into(), log_scale);
    Ok(Imported {
        config: model(dim, layers, BaseConfig::DiagNormal { trainable: false }),
        tensors,
    })
}
