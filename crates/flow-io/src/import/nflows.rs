//! nflows: `SimpleRealNVP`. Layers `_transform._transforms.{l}` with integer buffers
//! `identity_features` (kept) and `transform_features`, and a residual network
//! `transform_net` (`initial_layer`, `blocks.{b}.linear_layers.{0,1}`, `final_layer`,
//! ReLU). Its output is `[shift | raw scale]` with `scale = sigmoid(raw + 2) + 1e-3`;
//! data → noise; base `N(0, I)`.

use std::collections::HashMap;

use flow_models::BaseConfig;
use flow_realnvp::{Activation, NetConfig, Nets, OutputLayout, ScaleMap};

use super::{affine, model, ImportOptions, Imported, Weights};
use crate::IoError;

pub(crate) fn import(w: &mut Weights, opts: &ImportOptions) -> Result<Imported, IoError> {
    let root = "_transform._transforms";
    let ids = w.children(root);
    if ids.is_empty() {
        return Err(
            w.invalid("no `_transform._transforms.{l}` tensors: not an nflows SimpleRealNVP")
        );
    }
    let activation = opts.activation.unwrap_or(Activation::Relu);
    let mut tensors = HashMap::new();
    let mut layers = Vec::new();
    let mut dim = None;
    for (n, l) in ids.into_iter().enumerate() {
        let p = format!("{root}.{l}");
        if !w.contains(&format!("{p}.identity_features")) {
            return Err(w.unsupported(
                &p,
                "only affine coupling layers are supported (batch norm between layers is not)",
            ));
        }
        let keep = w.indices(&format!("{p}.identity_features"))?;
        let change = w.indices(&format!("{p}.transform_features"))?;
        let d = keep.len() + change.len();
        if *dim.get_or_insert(d) != d {
            return Err(w.invalid(format!(
                "layer {l} works on {d} features, the first layer on {}",
                dim.unwrap_or(0)
            )));
        }
        let mut mask = vec![None; d];
        for (&j, kept) in keep
            .iter()
            .map(|j| (j, true))
            .chain(change.iter().map(|j| (j, false)))
            .collect::<Vec<_>>()
            .iter()
        {
            match mask.get_mut(j) {
                Some(slot @ None) => *slot = Some(*kept),
                _ => {
                    return Err(w.invalid(format!(
                        "layer {l}: feature indices are not a partition of 0..{d}"
                    )))
                }
            }
        }
        let sorted = |v: &[usize]| v.windows(2).all(|p| p[0] < p[1]);
        if !sorted(&keep) || !sorted(&change) {
            return Err(w.invalid(format!("layer {l}: feature indices must be increasing")));
        }
        let mask: Vec<bool> = mask.into_iter().map(|m| m.unwrap_or(false)).collect();

        let net = format!("{p}.transform_net");
        let to = format!("layers.{n}.net");
        let init = w.shape(&format!("{net}.initial_layer.weight"))?;
        let [hidden, in_dim] = init[..] else {
            return Err(w.invalid(format!("`{net}.initial_layer.weight` has shape {init:?}")));
        };
        if in_dim != keep.len() {
            return Err(IoError::ShapeMismatch {
                path: w.path().to_path_buf(),
                name: format!("{net}.initial_layer.weight"),
                expected: vec![hidden, keep.len()],
                found: init,
            });
        }
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
            if w.children(&format!("{net}.blocks.{b}")).is_empty()
                && w.names()
                    .iter()
                    .any(|k| k.starts_with(&format!("{net}.blocks.{b}.batch_norm")))
            {
                return Err(w.invalid("residual blocks with batch norm are not supported"));
            }
            for j in 0..2 {
                linear(
                    w,
                    &format!("{net}.blocks.{b}.linear_layers.{j}"),
                    &format!("{to}.blocks.{b}.{j}"),
                    hidden,
                    hidden,
                )?;
            }
        }
        let out = 2 * change.len();
        linear(
            w,
            &format!("{net}.final_layer"),
            &format!("{to}.output"),
            out,
            hidden,
        )?;
        layers.push(affine(
            mask,
            Nets::Joint,
            OutputLayout::ShiftScale,
            NetConfig::Residual {
                hidden,
                blocks: blocks.len(),
                activation,
            },
            ScaleMap::Sigmoid,
            false,
        ));
    }
    Ok(Imported {
        config: model(dim.unwrap_or(0), layers, BaseConfig::StandardNormal),
        tensors,
    })
}
