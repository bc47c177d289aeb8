//! normflows: `NormalizingFlow(q0, flows)` with, at `flows.{i}`:
//! - `AffineCouplingBlock(MLP)`: `flows.1.param_map.net.*`. A block splits
//!   `[z₁ | z₂]` with `chunk(2)` (`z₁` gets the larger half), conditions on `z₁`, and
//!   its network's output interleaves shift (even columns) and scale (odd columns) with
//!   a raw `exp` scale;
//! - `CoupledRationalQuadraticSpline`: `prqct.*`, nflows' rational-quadratic coupling
//!   (see `nflows`: `identity_features`, `transform_features`, a `ResidualNet`
//!   `transform_net`, widths and heights divided by `√hidden`), plus
//!   `prqct.unconditional_transform.unnormalized_{widths,heights,derivatives}`
//!   `(kept, K | K | K − 1)`: a spline of the kept features with fixed parameters,
//!   applied after the coupling (data → latent) — here a spline coupling the other way
//!   whose network is one Linear layer with zero weights and those parameters as bias;
//! - `AutoregressiveRationalQuadraticSpline`: `mprqat.autoregressive_net.*`, a residual
//!   MADE (see `nets`) giving each feature's spline parameters (not rescaled);
//! - `MaskedAffineAutoregressive`: `autoregressive_net.*`, a residual MADE giving each
//!   feature's `(raw scale, shift)`, `scale = sigmoid(raw + 2) + 1e-3`;
//! - `Permute`: `perm` (and `inv_perm`) for `shuffle`; `swap` has no tensors.
//!
//! Indices without tensors are `swap` permutations, and the layout is taken as
//! (block, permutation) pairs — the library's own examples end with a permutation,
//! which has no tensors and so is assumed. Base `DiagGaussian` (`q0.loc`,
//! `q0.log_scale`, learned). Splines have linear tails at the tail bound (3 by default,
//! normflows').
//!
//! normflows defines its flows noise → data, and `log_prob` runs them last to first
//! through their `inverse`: the data → latent chain here. That `inverse` is the
//! affine blocks' and MAF's inverse (hence `inverted`), and the splines' forward map
//! (normflows wraps nflows' transforms the other way round).

use std::collections::HashMap;

use candle::Tensor;
use flow_models::BaseConfig;
use flow_nn::{Activation, NetConfig, Nets, OutputLayout, ScaleMap};

use super::{
    affine, model, nflows, spline_coupling, ImportOptions, Imported, LayerConfig, Source, Weights,
};
use crate::IoError;

pub(crate) fn import(w: &mut Weights, opts: &ImportOptions) -> Result<Imported, IoError> {
    // A MultiscaleFlow (Glow) has a base per level, `q0.{i}.…`, where a NormalizingFlow
    // has one, `q0.…`.
    if super::normflows_glow::detect(w) {
        return super::normflows_glow::import(w, opts);
    }
    let loc_shape = w.shape("q0.loc")?;
    let dim = *loc_shape.last().unwrap_or(&0);
    if dim < 2 {
        return Err(w.invalid(format!(
            "`q0.loc` has shape {loc_shape:?}: expected (1, dim) with dim ≥ 2"
        )));
    }
    let activation = opts
        .activation
        .unwrap_or(Source::Normflows.default_activation());
    let mut tensors = HashMap::new();
    let loc = w.float_any("q0.loc")?;
    let log_scale = w.float_any("q0.log_scale")?;
    for (name, t) in [("base.loc", loc), ("base.log_scale", log_scale)] {
        if t.elem_count() != dim {
            return Err(w.invalid(format!("`q0.{}` must hold {dim} values", &name[5..])));
        }
        tensors.insert(
            name.to_string(),
            t.reshape(dim).map_err(IoError::candle(w.path()))?,
        );
    }
    let flows = w.children("flows");
    let Some(&last) = flows.last() else {
        return Err(w.invalid("no `flows.{i}` tensors: not a normflows NormalizingFlow"));
    };
    // Noise → data order: index 0 first. Indices without tensors are swap permutations.
    // A swap leaves no tensors, so one after the last block is invisible: the layout is
    // taken to be normflows' usual pairs (block, permutation), the last pair included.
    let mut forward: Vec<LayerConfig> = Vec::new();
    let k = dim.div_ceil(2);
    let end = if last % 2 == 0 { last + 1 } else { last };
    let bound = opts
        .tail_bound
        .or(Source::Normflows.default_tail_bound())
        .unwrap_or_default();
    for i in 0..=end {
        let p = format!("flows.{i}");
        // Whether any tensor of this flow's names starts with `part`.
        let has = |w: &Weights, part: &str| {
            let prefix = format!("{p}.{part}");
            w.names().iter().any(|name| name.starts_with(&prefix))
        };
        let n = forward.len();
        let layer_dim;
        if has(w, "flows.1.param_map.net.") {
            let prefix = format!("{p}.flows.1.param_map.net");
            let (net, in_dim, out_dim) = w.mlp(
                &prefix,
                &format!("layers.{n}.net"),
                activation,
                &mut tensors,
            )?;
            if in_dim != k || out_dim != 2 * (dim - k) {
                return Err(w.invalid(format!(
                    "`{prefix}` maps {in_dim} → {out_dim} features; a coupling over {dim} features needs {k} → {}",
                    2 * (dim - k)
                )));
            }
            forward.push(affine(
                (0..dim).map(|j| j < k).collect(),
                Nets::Joint,
                OutputLayout::Interleaved,
                net,
                ScaleMap::Exp,
                true,
            ));
            layer_dim = dim;
        } else if has(w, "prqct.") {
            let prqct = format!("{p}.prqct");
            let unconditional = format!("{prqct}.unconditional_transform");
            let with_spline = has(w, "prqct.unconditional_transform.");
            // Noise → data, the unconditional spline of the kept features (index n)
            // comes before the coupling.
            let at = n + usize::from(with_spline);
            let (coupling, d) =
                nflows::coupling(w, &prqct, i, at, activation, bound, &mut tensors)?;
            layer_dim = d;
            if with_spline {
                let LayerConfig::SplineCoupling(c) = &coupling else {
                    return Err(w.unsupported(&prqct, "an affine coupling with a spline beside it"));
                };
                let layer = unconditional_spline(
                    w,
                    &unconditional,
                    &c.mask,
                    n,
                    c.transform,
                    activation,
                    &mut tensors,
                )?;
                forward.push(layer);
            }
            forward.push(coupling);
        } else if has(w, "mprqat.") {
            let (layer, d) = nflows::masked_autoregressive(
                w,
                &format!("{p}.mprqat"),
                n,
                activation,
                bound,
                ScaleMap::Sigmoid,
                &mut tensors,
            )?;
            forward.push(layer);
            layer_dim = d;
        } else if has(w, "autoregressive_net.") {
            // normflows' copy of nflows' class scales by sigmoid(raw + 2) + 1e-3.
            let (layer, d) = nflows::masked_autoregressive(
                w,
                &p,
                n,
                activation,
                bound,
                ScaleMap::Sigmoid,
                &mut tensors,
            )?;
            let LayerConfig::AffineAutoregressive(mut c) = layer else {
                return Err(w.unsupported(
                    &p,
                    "MaskedAffineAutoregressive needs 2 parameters per feature",
                ));
            };
            // normflows' data → latent direction is the MADE's d-pass inverse.
            c.inverted = true;
            forward.push(LayerConfig::AffineAutoregressive(c));
            layer_dim = d;
        } else if w.contains(&format!("{p}.perm")) {
            let perm = w.indices(&format!("{p}.perm"))?;
            w.skip(&format!("{p}.inv_perm"));
            layer_dim = perm.len();
            forward.push(LayerConfig::Permute { perm });
        } else if has(w, "") {
            return Err(w.unsupported(
                &p,
                "only AffineCouplingBlock, CoupledRationalQuadraticSpline, AutoregressiveRationalQuadraticSpline, MaskedAffineAutoregressive and Permute flows are supported",
            ));
        } else {
            // Permute(mode="swap"): [z₁ | z₂] → [z₂ | z₁] with z₁ = z[:, :dim/2].
            let h = dim / 2;
            forward.push(LayerConfig::Permute {
                perm: (h..dim).chain(0..h).collect(),
            });
            layer_dim = dim;
        }
        if layer_dim != dim {
            let name = w
                .names()
                .into_iter()
                .find(|k| k.starts_with(&format!("{p}.")))
                .unwrap_or(p);
            return Err(w.invalid(format!(
                "`{name}` is for {layer_dim} features, `q0.loc` for {dim}"
            )));
        }
    }
    // Data → latent: last to first, permutations inverted (the other layers say their
    // direction themselves). Parameters follow their layer.
    let n = forward.len();
    let mut layers = Vec::with_capacity(n);
    let mut renamed = HashMap::new();
    for (new, old) in (0..n).rev().enumerate() {
        let layer = match forward[old].clone() {
            LayerConfig::Permute { perm } => {
                let mut inv = vec![0; perm.len()];
                for (j, &p) in perm.iter().enumerate() {
                    inv[p] = j;
                }
                LayerConfig::Permute { perm: inv }
            }
            other => other,
        };
        layers.push(layer);
        let from = format!("layers.{old}.");
        for (name, t) in tensors.iter().filter(|(k, _)| k.starts_with(&from)) {
            renamed.insert(format!("layers.{new}.{}", &name[from.len()..]), t.clone());
        }
    }
    for (name, t) in tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("layers."))
    {
        renamed.insert(name, t);
    }
    Ok(Imported::new(
        model(dim, layers, BaseConfig::DiagNormal { trainable: true }),
        renamed,
    ))
}

/// normflows' `PiecewiseRationalQuadraticCDF` at `prefix` over the features kept by a
/// coupling of `mask` (true = kept): parameters per feature without any input, as a
/// spline coupling the other way (layer `n`) whose network is one Linear layer with
/// zero weights and the parameters, feature by feature, as its bias. Its output does
/// not depend on the features it reads, so the order beside the coupling is free.
fn unconditional_spline(
    w: &mut Weights,
    prefix: &str,
    mask: &[bool],
    n: usize,
    spline: flow_nn::Spline,
    activation: Activation,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<LayerConfig, IoError> {
    let kept = mask.iter().filter(|m| **m).count();
    let k = spline.bins;
    let widths = w.float(&format!("{prefix}.unnormalized_widths"), &[kept, k])?;
    let heights = w.float(&format!("{prefix}.unnormalized_heights"), &[kept, k])?;
    let derivatives = w.float(
        &format!("{prefix}.unnormalized_derivatives"),
        &[kept, k - 1],
    )?;
    let bias = Tensor::cat(&[widths, heights, derivatives], 1)
        .and_then(|t| t.flatten_all())
        .map_err(IoError::candle(w.path()))?;
    let weight = Tensor::zeros(
        (kept * (3 * k - 1), mask.len() - kept),
        candle::DType::F32,
        &candle::Device::Cpu,
    )
    .map_err(IoError::candle(w.path()))?;
    tensors.insert(format!("layers.{n}.net.0.weight"), weight);
    tensors.insert(format!("layers.{n}.net.0.bias"), bias);
    let net = NetConfig::Mlp {
        hidden: Vec::new(),
        activation,
    };
    Ok(spline_coupling(
        mask.iter().map(|m| !m).collect(),
        net,
        spline,
    ))
}
