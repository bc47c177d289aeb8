//! The reference `stacked_NVP` code: `bijectors.{i}.{sig_net,mu_net}.{0,2}` (or a list
//! named `rvnps`), LeakyReLU(0.01), raw `exp` scale, layer `i` swapping the halves when
//! odd, data → latent, base `N(0, I)`.

use std::{collections::HashMap, path::Path};

use candle::Tensor;
use flow_models::{BaseConfig, ModelConfig};
use flow_nn::{NetConfig, Nets, OutputLayout, ScaleMap};
use flow_realnvp::CouplingLayer;

use super::{affine, model, ImportOptions, Imported, Source, Weights};
use crate::IoError;

pub(crate) fn import(w: &mut Weights, opts: &ImportOptions) -> Result<Imported, IoError> {
    let list = ["bijectors", "rvnps"]
        .into_iter()
        .find(|l| !w.children(l).is_empty())
        .ok_or_else(|| {
            w.invalid("no `bijectors.{i}.sig_net` tensors: not a seed stacked_NVP state dict")
        })?;
    let layers = w.children(list);
    if layers != (0..layers.len()).collect::<Vec<_>>() {
        return Err(w.invalid(format!(
            "`{list}` layers are not numbered 0..{}",
            layers.len()
        )));
    }
    let activation = opts.activation.unwrap_or(Source::Seed.default_activation());
    let mut tensors = HashMap::new();
    let mut configs = Vec::new();
    let mut dim = None;
    for i in layers {
        let (net, k_in, d_out) = w.mlp(
            &format!("{list}.{i}.sig_net"),
            &format!("layers.{i}.s"),
            activation,
            &mut tensors,
        )?;
        let (t_net, t_in, t_out) = w.mlp(
            &format!("{list}.{i}.mu_net"),
            &format!("layers.{i}.t"),
            activation,
            &mut tensors,
        )?;
        if (t_in, t_out) != (k_in, d_out) || t_net != net {
            return Err(w.invalid(format!(
                "layer {i}: sig_net and mu_net have different shapes"
            )));
        }
        let d = k_in + d_out;
        if *dim.get_or_insert(d) != d {
            return Err(w.invalid(format!(
                "layer {i} works on {d} features, layer 0 on {}",
                dim.unwrap_or(0)
            )));
        }
        // Even layers keep x[:, :k]; odd layers swap the halves and keep x[:, k:].
        let mask: Vec<bool> = if i % 2 == 0 {
            (0..d).map(|j| j < k_in).collect()
        } else {
            (0..d).map(|j| j >= d - k_in).collect()
        };
        configs.push(affine(
            mask,
            Nets::Separate,
            OutputLayout::ScaleShift,
            net,
            ScaleMap::Exp,
            false,
        ));
    }
    let dim = dim.unwrap_or(0);
    Ok(Imported::new(
        model(dim, configs, BaseConfig::StandardNormal),
        tensors,
    ))
}

/// Writes `config`'s tensors in the seed code's layout, if the model has that
/// architecture: affine couplings with separate plain `s`/`t` networks, raw `exp`
/// scale, the seed's alternating masks, no standardisation, base `N(0, I)`.
pub fn export_seed(
    path: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), IoError> {
    let unfit = |why: String| IoError::Invalid {
        path: path.to_path_buf(),
        message: format!("cannot export in the seed layout: {why}"),
    };
    if config.standardize {
        return Err(unfit(
            "the model standardises its input, which the seed code cannot express".into(),
        ));
    }
    if config.base != BaseConfig::StandardNormal {
        return Err(unfit("the seed code's base distribution is N(0, I)".into()));
    }
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (i, layer) in config.layers.iter().enumerate() {
        let Ok(CouplingLayer::Affine(c)) = layer.tagged_as::<CouplingLayer>() else {
            return Err(unfit(format!("layer {i} is not an affine coupling")));
        };
        let d = config.dim;
        let k = c.mask.iter().filter(|m| **m).count();
        let expected: Vec<bool> = if i % 2 == 0 {
            (0..d).map(|j| j < k).collect()
        } else {
            (0..d).map(|j| j >= d - k).collect()
        };
        if c.mask != expected
            || c.transform.scale != ScaleMap::Exp
            || c.inverted
            || c.context_dim != 0
            || c.conditioner.nets != Nets::Separate
        {
            return Err(unfit(format!(
                "layer {i} is not a seed coupling (mask, exp scale, separate s/t networks)"
            )));
        }
        let NetConfig::Mlp { hidden, .. } = &c.conditioner.net else {
            return Err(unfit(format!("layer {i} uses residual networks")));
        };
        for (ours, theirs) in [("s", "sig_net"), ("t", "mu_net")] {
            for j in 0..=hidden.len() {
                for p in ["weight", "bias"] {
                    let name = format!("layers.{i}.{ours}.{}.{p}", 2 * j);
                    let t = tensors.get(&name).ok_or_else(|| IoError::MissingTensor {
                        path: path.to_path_buf(),
                        name: name.clone(),
                    })?;
                    out.insert(format!("bijectors.{i}.{theirs}.{}.{p}", 2 * j), t.clone());
                }
            }
        }
    }
    let mut sorted: Vec<(&String, &Tensor)> = out.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(sorted.into_iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| unfit(e.to_string()))?;
    crate::write_atomic(path, &bytes)
}
