//! normflows: `NormalizingFlow(q0, flows)` with `AffineCouplingBlock(MLP)` at the
//! indices holding `flows.{i}.flows.1.param_map.net.*` and `Permute` at the others
//! (`swap` unless `perm` buffers say otherwise), as (block, permutation) pairs — the
//! library's own examples end with a permutation, which has no tensors and so is
//! assumed; base `DiagGaussian` (`q0.loc`, `q0.log_scale`, learned).
//!
//! normflows defines its flows noise → data, so the data → latent chain runs them
//! last to first, each inverted. A block splits `[z₁ | z₂]` with `chunk(2)`
//! (`z₁` gets the larger half), conditions on `z₁`, and its network's output
//! interleaves shift (even columns) and scale (odd columns) with a raw `exp` scale.

use std::collections::HashMap;

use flow_models::BaseConfig;
use flow_realnvp::{Activation, Nets, OutputLayout, ScaleMap};

use super::{affine, model, ImportOptions, Imported, LayerConfig, Weights};
use crate::IoError;

pub(crate) fn import(w: &mut Weights, opts: &ImportOptions) -> Result<Imported, IoError> {
    let loc_shape = w.shape("q0.loc")?;
    let dim = *loc_shape.last().unwrap_or(&0);
    if dim < 2 {
        return Err(w.invalid(format!(
            "`q0.loc` has shape {loc_shape:?}: expected (1, dim) with dim ≥ 2"
        )));
    }
    let activation = opts.activation.unwrap_or(Activation::Relu);
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
    for i in 0..=end {
        let prefix = format!("flows.{i}.flows.1.param_map.net");
        if w.children(&prefix).is_empty() {
            if w.contains(&format!("flows.{i}.perm")) {
                let perm = w.indices(&format!("flows.{i}.perm"))?;
                w.skip(&format!("flows.{i}.inv_perm"));
                forward.push(LayerConfig::Permute { perm });
            } else {
                // Permute(mode="swap"): [z₁ | z₂] → [z₂ | z₁] with z₁ = z[:, :dim/2].
                let h = dim / 2;
                forward.push(LayerConfig::Permute {
                    perm: (h..dim).chain(0..h).collect(),
                });
            }
            continue;
        }
        let n = forward.len();
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
    }
    // Data → latent: last to first, each inverted. Parameters follow their layer.
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
    Ok(Imported {
        config: model(dim, layers, BaseConfig::DiagNormal { trainable: true }),
        tensors: renamed,
    })
}
