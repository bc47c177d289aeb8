//! Our models in zuko's layout, the mapping [`super::zuko`] reads turned around:
//! `transform.transforms.{t}` layers and a `base.loc` / `base.scale` diagonal Gaussian,
//! so that zuko's `RealNVP`, `NSF` or `MAF`, built with the arguments
//! [`export_zuko`] returns, loads the file with `load_state_dict`.
//!
//! - Affine couplings become `GeneralCouplingTransform`s: a `mask` (true = kept) and one
//!   MLP `hyper.{0,2,…}` whose outputs hold `(shift, a)` per transformed feature.
//!   Separate scale and shift networks become one network of twice the width whose
//!   weights are block-diagonal: the same function, exactly.
//! - Spline couplings keep zuko's `K` widths, `K` heights and `K − 1` derivatives per
//!   feature; autoregressive layers become `MaskedAutoregressiveTransform`s: the
//!   features' ranks as `order` and the MADE masks beside the weights.
//! - A model that standardises its context has that folded into the first layer of
//!   every network: zuko's flows read the context as given.
//! - A model that standardises its input gets one more transform in front, an
//!   `UnconditionalTransform` of `torch.distributions.AffineTransform` holding
//!   `−mean / std` and `1 / std` (`transform.transforms.0._0`, `._1`).

use std::{collections::HashMap, path::Path};

use candle::{DType, Device, Tensor};
use flow_models::{BaseConfig, ModelConfig};
use flow_nn::{
    Activation, AutoregressiveConfig, CouplingConfig, NetConfig, Nets, OutputLayout, ScaleMap,
    Spline, SplineStyle,
};

use super::{zuko::ROOT, LayerConfig};
use crate::IoError;

/// One kind of layer throughout: what zuko builds a whole flow of.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    AffineCoupling { clamp: f64 },
    SplineCoupling { bins: usize, bound: f64, slope: f64 },
    AffineAutoregressive { clamp: f64 },
    SplineAutoregressive { bins: usize, bound: f64, slope: f64 },
}

struct Export<'a> {
    path: &'a Path,
    tensors: &'a HashMap<String, Tensor>,
    out: HashMap<String, Tensor>,
    /// The couplings' masks, in order.
    masks: Vec<Vec<bool>>,
    /// Whether a coupling keeps other features than zuko's `RealNVP` layer would:
    /// the flow is then built from its layers one by one.
    own_masks: bool,
}

impl Export<'_> {
    fn unfit(&self, why: impl Into<String>) -> IoError {
        IoError::Invalid {
            path: self.path.to_path_buf(),
            message: format!("cannot export to zuko: {}", why.into()),
        }
    }

    fn candle(&self) -> impl FnOnce(candle::Error) -> IoError + '_ {
        IoError::candle(self.path)
    }

    fn get(&self, name: &str) -> Result<Tensor, IoError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| IoError::MissingTensor {
                path: self.path.to_path_buf(),
                name: name.to_string(),
            })?;
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(self.candle())
    }

    fn put(&mut self, name: String, t: Tensor) {
        self.out.insert(name, t);
    }

    /// The plain MLP under `from` (`hidden` layers, `{2j}.weight` / `.bias`), as
    /// `hyper.{2j}` of transform `to`, its output rows reordered by `rows`.
    fn mlp(&mut self, from: &str, to: &str, layers: usize, rows: &[usize]) -> Result<(), IoError> {
        for j in 0..=layers {
            let mut w = self.get(&format!("{from}.{}.weight", 2 * j))?;
            let mut b = self.get(&format!("{from}.{}.bias", 2 * j))?;
            if j == layers {
                let idx = index(rows, self)?;
                w = w.index_select(&idx, 0).map_err(self.candle())?;
                b = b.index_select(&idx, 0).map_err(self.candle())?;
            }
            self.put(format!("{to}.hyper.{}.weight", 2 * j), w);
            self.put(format!("{to}.hyper.{}.bias", 2 * j), b);
        }
        Ok(())
    }

    /// Separate `s` and `t` networks under `from` as one network of twice the width:
    /// the first layer stacks both, hidden layers are block-diagonal, and the output
    /// holds `(shift, a)` per feature.
    fn merged(&mut self, from: &str, to: &str, layers: usize) -> Result<(), IoError> {
        for j in 0..=layers {
            let ws = self.get(&format!("{from}.s.{}.weight", 2 * j))?;
            let wt = self.get(&format!("{from}.t.{}.weight", 2 * j))?;
            let bs = self.get(&format!("{from}.s.{}.bias", 2 * j))?;
            let bt = self.get(&format!("{from}.t.{}.bias", 2 * j))?;
            let (o, i) = ws.dims2().map_err(self.candle())?;
            let zeros = Tensor::zeros((o, i), DType::F32, &Device::Cpu).map_err(self.candle())?;
            let cat = |a: &[&Tensor], dim| Tensor::cat(a, dim);
            let (w, b) = if j == 0 {
                (cat(&[&ws, &wt], 0), cat(&[&bs, &bt], 0))
            } else if j < layers {
                let top = cat(&[&ws, &zeros], 1).map_err(self.candle())?;
                let bottom = cat(&[&zeros, &wt], 1).map_err(self.candle())?;
                (cat(&[&top, &bottom], 0), cat(&[&bs, &bt], 0))
            } else {
                // Rows t₀, s₀, t₁, s₁, …: the t network reads the second half.
                let s_rows = cat(&[&ws, &zeros], 1).map_err(self.candle())?;
                let t_rows = cat(&[&zeros, &wt], 1).map_err(self.candle())?;
                let w =
                    Tensor::stack(&[&t_rows, &s_rows], 1).and_then(|w| w.reshape((2 * o, 2 * i)));
                let b = Tensor::stack(&[&bt, &bs], 1).and_then(|b| b.reshape(2 * o));
                (w, b)
            };
            self.put(
                format!("{to}.hyper.{}.weight", 2 * j),
                w.map_err(self.candle())?,
            );
            self.put(
                format!("{to}.hyper.{}.bias", 2 * j),
                b.map_err(self.candle())?,
            );
        }
        Ok(())
    }
}

fn index(rows: &[usize], e: &Export) -> Result<Tensor, IoError> {
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Tensor::from_vec(idx, rows.len(), &Device::Cpu).map_err(e.candle())
}

/// The output rows of a joint affine network in `layout`, reordered to zuko's
/// `(shift, a)` per feature for `n` features.
fn affine_rows(layout: OutputLayout, n: usize) -> Vec<usize> {
    (0..2 * n)
        .map(|r| {
            let (feature, shift) = (r / 2, r % 2 == 0);
            match (layout, shift) {
                (OutputLayout::Interleaved, _) => r,
                (OutputLayout::ByFeature, _) => r ^ 1,
                (OutputLayout::ScaleShift, true) => n + feature,
                (OutputLayout::ScaleShift, false) => feature,
                (OutputLayout::ShiftScale, true) => feature,
                (OutputLayout::ShiftScale, false) => n + feature,
            }
        })
        .collect()
}

/// zuko's slope for a soft-clamped log-scale: `a / (1 + |a / ln slope|)`.
fn affine_slope(scale: ScaleMap, layer: usize) -> Result<f64, String> {
    match scale {
        ScaleMap::SoftClamp { clamp } => Ok(clamp),
        other => Err(format!(
            "layer {layer} bounds its log-scale with {other:?}; zuko's affine transforms soft-clamp it (scale soft-clamp)"
        )),
    }
}

/// The spline's settings as zuko's `MonotonicRQSTransform` takes them.
fn spline_kind(s: &Spline, layer: usize) -> Result<(usize, f64, f64), String> {
    if s.style != SplineStyle::Zuko {
        return Err(format!(
            "layer {layer}'s spline takes its raw parameters as nflows does (style {:?}); zuko's MonotonicRQSTransform takes them its own way (style zuko, as `flow import --from zuko` makes)",
            s.style
        ));
    }
    Ok((s.bins, s.bound, s.min_derivative))
}

/// The hidden widths of a plain MLP, or why it is not one.
fn plain(net: &NetConfig, layer: usize) -> Result<(Vec<usize>, Activation), String> {
    match net {
        NetConfig::Mlp { hidden, activation } => Ok((hidden.clone(), *activation)),
        _ => Err(format!(
            "layer {layer} uses residual networks; zuko's are plain MLPs"
        )),
    }
}

/// `torch.nn.X` for an activation.
fn torch_activation(a: Activation) -> &'static str {
    match a {
        Activation::Relu => "torch.nn.ReLU",
        Activation::LeakyRelu => "torch.nn.LeakyReLU",
        Activation::Tanh => "torch.nn.Tanh",
        Activation::Gelu => "torch.nn.GELU",
    }
}

/// How many features layer `i` of zuko's `RealNVP` keeps: its mask is
/// `arange(d) % 2 == i % 2`.
fn zuko_kept(i: usize, d: usize) -> usize {
    (0..d).filter(|j| j % 2 == i % 2).count()
}

/// Writes `config`'s tensors in zuko's layout to `path` and returns the Python that
/// builds the flow that loads them; refuses, naming why, a model zuko cannot express.
pub fn export_zuko(
    path: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<String, IoError> {
    let mut e = Export {
        path,
        tensors,
        out: HashMap::new(),
        masks: Vec::new(),
        own_masks: false,
    };
    let d = config.dim;
    let context = config.context_dim;
    let offset = usize::from(config.standardize);
    let mut kind: Option<Kind> = None;
    let mut net: Option<(Vec<usize>, Activation)> = None;
    for (i, spec) in config.layers.iter().enumerate() {
        let layer: LayerConfig = spec.tagged_as().map_err(|m| e.unfit(m))?;
        let to = format!("{ROOT}.{}", i + offset);
        let from = format!("layers.{i}");
        let (this, hidden) = match layer {
            LayerConfig::Affine(c) => {
                let hidden = coupling(&mut e, &c, i, &from, &to, d, Some(c.transform.scale))?;
                let clamp = affine_slope(c.transform.scale, i).map_err(|m| e.unfit(m))?;
                (Kind::AffineCoupling { clamp }, hidden)
            }
            LayerConfig::SplineCoupling(c) => {
                let (bins, bound, slope) = spline_kind(&c.transform, i).map_err(|m| e.unfit(m))?;
                let hidden = coupling(&mut e, &c, i, &from, &to, d, None)?;
                (Kind::SplineCoupling { bins, bound, slope }, hidden)
            }
            LayerConfig::AffineAutoregressive(c) => {
                let clamp = affine_slope(c.transform.scale, i).map_err(|m| e.unfit(m))?;
                let hidden = autoregressive(&mut e, &c, i, &from, &to, 2, true)?;
                (Kind::AffineAutoregressive { clamp }, hidden)
            }
            LayerConfig::SplineAutoregressive(c) => {
                let (bins, bound, slope) = spline_kind(&c.transform, i).map_err(|m| e.unfit(m))?;
                let params = 3 * bins - 1;
                let hidden = autoregressive(&mut e, &c, i, &from, &to, params, false)?;
                (Kind::SplineAutoregressive { bins, bound, slope }, hidden)
            }
            LayerConfig::Permute { .. } => {
                return Err(e.unfit(format!(
                    "layer {i} is a permutation; zuko's flows order features inside their layers"
                )))
            }
        };
        if *kind.get_or_insert(this) != this {
            return Err(e.unfit(format!(
                "layer {i} is of another kind than layer 0; a zuko flow is one kind throughout"
            )));
        }
        if *net.get_or_insert(hidden.clone()) != hidden {
            return Err(e.unfit(format!(
                "layer {i}'s networks differ from layer 0's; zuko's flows give every layer the same"
            )));
        }
    }
    let (Some(kind), Some((hidden, activation))) = (kind, net) else {
        return Err(e.unfit("the model has no layers"));
    };
    base(&mut e, config)?;
    if config.standardize_context {
        for i in 0..config.layers.len() {
            fold_context_standardization(&mut e, &format!("{ROOT}.{}", i + offset), context)?;
        }
    }
    if config.standardize {
        let mean = e.get("standardize.mean")?;
        let std = e.get("standardize.std")?;
        let scale = std.recip().map_err(e.candle())?;
        let loc = mean.mul(&scale).and_then(|t| t.neg()).map_err(e.candle())?;
        e.put(format!("{ROOT}.0._0"), loc);
        e.put(format!("{ROOT}.0._1"), scale);
    }
    let masks = e.own_masks.then_some(e.masks.as_slice());
    let code = constructor(
        kind,
        d,
        context,
        config.layers.len(),
        &hidden,
        activation,
        masks,
    );
    let code = if config.standardize {
        format!(
            "{code}\nflow.transform = zuko.lazy.LazyComposedTransform(zuko.lazy.UnconditionalTransform(torch.distributions.AffineTransform, torch.zeros({d}), torch.ones({d}), event_dim=1, buffer=True), *flow.transform.transforms)"
        )
    } else {
        code
    };
    let mut sorted: Vec<(&String, &Tensor)> = e.out.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(sorted.into_iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|err| e.unfit(err.to_string()))?;
    crate::write_atomic(path, &bytes)?;
    Ok(code)
}

/// Folds the model's context standardisation into the first layer of transform
/// `to`'s network, whose last `context` inputs are the context: their weights are
/// divided by the context's std, and the bias takes off what the mean contributed
/// (through the layer's mask, if it has one), so that the network reads the context
/// as given and computes what it computed on the standardised one.
fn fold_context_standardization(e: &mut Export, to: &str, context: usize) -> Result<(), IoError> {
    let mean = e.get("context_standardize.mean")?;
    let std = e.get("context_standardize.std")?;
    let (w_name, b_name) = (format!("{to}.hyper.0.weight"), format!("{to}.hyper.0.bias"));
    let (Some(w), Some(b)) = (e.out.get(&w_name), e.out.get(&b_name)) else {
        return Err(e.unfit(format!("transform {to} has no network")));
    };
    let fold = || -> candle::Result<(Tensor, Tensor)> {
        let inputs = w.dim(1)?;
        let data = w.narrow(1, 0, inputs - context)?;
        let scaled = w
            .narrow(1, inputs - context, context)?
            .broadcast_div(&std.unsqueeze(0)?)?;
        let seen = match e.out.get(&format!("{to}.hyper.0.mask")) {
            Some(mask) => {
                let mask = mask.narrow(1, inputs - context, context)?;
                scaled.mul(&mask.to_dtype(DType::F32)?)?
            }
            None => scaled.clone(),
        };
        let shift = seen.matmul(&mean.unsqueeze(1)?)?.squeeze(1)?;
        Ok((Tensor::cat(&[&data, &scaled], 1)?, b.sub(&shift)?))
    };
    let (w, b) = fold().map_err(e.candle())?;
    e.put(w_name, w);
    e.put(b_name, b);
    Ok(())
}

/// A coupling at `from` as transform `to`; its hidden widths (as zuko's network has
/// them) and activation. `scale` is an affine coupling's log-scale map.
fn coupling<T>(
    e: &mut Export,
    c: &CouplingConfig<T>,
    i: usize,
    from: &str,
    to: &str,
    d: usize,
    scale: Option<ScaleMap>,
) -> Result<(Vec<usize>, Activation), IoError> {
    if c.inverted {
        return Err(e.unfit(format!("layer {i} is used inverted")));
    }
    let kept = c.mask.iter().filter(|m| **m).count();
    if kept != zuko_kept(i, d) {
        e.own_masks = true;
    }
    e.masks.push(c.mask.clone());
    let mask = Tensor::from_vec(
        c.mask.iter().map(|&m| u8::from(m)).collect::<Vec<u8>>(),
        d,
        &Device::Cpu,
    )
    .map_err(e.candle())?;
    e.put(format!("{to}.mask"), mask);
    let (hidden, activation) = plain(&c.conditioner.net, i).map_err(|m| e.unfit(m))?;
    let n = d - kept;
    match (c.conditioner.nets, scale) {
        (Nets::Joint, Some(_)) => {
            e.mlp(
                &format!("{from}.net"),
                to,
                hidden.len(),
                &affine_rows(c.conditioner.layout, n),
            )?;
            Ok((hidden, activation))
        }
        (Nets::Separate, Some(_)) => {
            e.merged(from, to, hidden.len())?;
            Ok((hidden.iter().map(|h| 2 * h).collect(), activation))
        }
        (Nets::Joint, None) if c.conditioner.layout == OutputLayout::ByFeature => {
            let rows = (0..out_rows(e, from, hidden.len())?).collect::<Vec<_>>();
            e.mlp(&format!("{from}.net"), to, hidden.len(), &rows)?;
            Ok((hidden, activation))
        }
        _ => Err(e.unfit(format!(
            "layer {i}'s spline parameters are not laid out feature by feature in one network"
        ))),
    }
}

/// The output width of the joint network at `from`.
fn out_rows(e: &Export, from: &str, layers: usize) -> Result<usize, IoError> {
    let b = e.get(&format!("{from}.net.{}.bias", 2 * layers))?;
    b.dim(0).map_err(e.candle())
}

/// An autoregressive layer at `from` as transform `to` (`params` per feature; affine
/// ones reorder `(s, t)` to zuko's `(shift, a)`); its hidden widths and activation.
fn autoregressive<T: flow_nn::Transform>(
    e: &mut Export,
    c: &AutoregressiveConfig<T>,
    i: usize,
    from: &str,
    to: &str,
    params: usize,
    affine: bool,
) -> Result<(Vec<usize>, Activation), IoError> {
    if c.inverted {
        return Err(e.unfit(format!(
            "layer {i} is used inverted (IAF); zuko's MAF layers are not"
        )));
    }
    if c.residual_blocks > 0 {
        return Err(e.unfit(format!(
            "layer {i} uses residual networks; zuko's are plain MLPs"
        )));
    }
    let d = c.order.len();
    let mut rank = vec![0usize; d];
    for (k, &f) in c.order.iter().enumerate() {
        rank[f] = k;
    }
    let order = Tensor::from_vec(
        rank.iter().map(|&r| r as i64).collect::<Vec<i64>>(),
        d,
        &Device::Cpu,
    )
    .map_err(e.candle())?;
    e.put(format!("{to}.order"), order);
    let layers = c.hidden.len();
    let rows: Vec<usize> = if affine {
        (0..d * params).map(|r| r ^ 1).collect()
    } else {
        (0..d * params).collect()
    };
    let made = format!("{from}.made");
    e.mlp(&made, to, layers, &rows)?;
    let masks = if c.stored_masks {
        (0..=layers)
            .map(|j| e.get(&format!("{made}.{}.mask", 2 * j)))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        let ranks: Vec<usize> = rank.iter().map(|r| r + 1).collect();
        flow_nn::made_masks(&ranks, c.context_dim, &c.hidden, params, &Device::Cpu)
            .map_err(e.candle())?
    };
    let last = masks.len().saturating_sub(1);
    for (j, mask) in masks.into_iter().enumerate() {
        let mask = if j == last {
            mask.index_select(&index(&rows, e)?, 0)
                .map_err(e.candle())?
        } else {
            mask
        };
        let mask = mask
            .ne(0.0)
            .and_then(|m| m.to_dtype(DType::U8))
            .map_err(e.candle())?;
        e.put(format!("{to}.hyper.{}.mask", 2 * j), mask);
    }
    Ok((c.hidden.clone(), c.activation))
}

/// `base.loc` and `base.scale` of zuko's diagonal Gaussian.
fn base(e: &mut Export, config: &ModelConfig) -> Result<(), IoError> {
    let d = config.dim;
    let (loc, scale) = match config.base {
        BaseConfig::StandardNormal => (
            Tensor::zeros(d, DType::F32, &Device::Cpu),
            Tensor::ones(d, DType::F32, &Device::Cpu),
        ),
        BaseConfig::DiagNormal { .. } => (Ok(e.get("base.loc")?), e.get("base.log_scale")?.exp()),
        BaseConfig::Mixture { .. } => {
            return Err(e.unfit("the base is a mixture; zuko's flows have a diagonal Gaussian"))
        }
    };
    let loc = loc.map_err(e.candle())?;
    let scale = scale.map_err(e.candle())?;
    e.put("base.loc".into(), loc);
    e.put("base.scale".into(), scale);
    Ok(())
}

/// The Python that builds zuko's flow of `layers` layers of `kind`; couplings with
/// `masks` of their own are built one by one.
fn constructor(
    kind: Kind,
    d: usize,
    context: usize,
    layers: usize,
    hidden: &[usize],
    activation: Activation,
    masks: Option<&[Vec<bool>]>,
) -> String {
    let widths: Vec<String> = hidden.iter().map(usize::to_string).collect();
    let mut args = vec![
        format!("features={d}"),
        format!("context={context}"),
        format!("transforms={layers}"),
    ];
    let affine = |clamp: f64| {
        format!(
            "univariate=functools.partial(zuko.transforms.MonotonicAffineTransform, slope=math.exp(-{clamp:?}))"
        )
    };
    let spline = |bins: usize, bound: f64, slope: f64| {
        [
            format!(
                "univariate=functools.partial(zuko.transforms.MonotonicRQSTransform, bound={bound:?}, slope={slope:?})"
            ),
            format!("shapes=[({bins},), ({bins},), ({},)]", bins - 1),
        ]
    };
    let name = match kind {
        Kind::AffineCoupling { clamp } => {
            args.push(affine(clamp));
            "RealNVP"
        }
        Kind::SplineCoupling { bins, bound, slope } => {
            args.extend(spline(bins, bound, slope));
            "RealNVP"
        }
        Kind::AffineAutoregressive { clamp } => {
            args.push(affine(clamp));
            "MAF"
        }
        Kind::SplineAutoregressive { bins, bound, slope } => {
            args.extend(spline(bins, bound, slope));
            "MAF"
        }
    };
    args.push(format!("hidden_features=[{}]", widths.join(", ")));
    if activation != Activation::Relu {
        args.push(format!("activation={}", torch_activation(activation)));
    }
    let imports = "import functools, math, safetensors.torch, torch, zuko";
    let Some(masks) = masks else {
        return format!("{imports}\nflow = zuko.flows.{name}({})", args.join(", "));
    };
    // zuko's RealNVP fixes how many features each layer keeps; these layers keep
    // others, so each is built with its own mask (its values are loaded with the rest).
    let masks: Vec<String> = masks
        .iter()
        .map(|m| {
            let v: Vec<&str> = m
                .iter()
                .map(|&k| if k { "True" } else { "False" })
                .collect();
            format!("[{}]", v.join(", "))
        })
        .collect();
    let layer_args: Vec<&String> = args
        .iter()
        .filter(|a| !a.starts_with("transforms="))
        .collect();
    let layer_args: Vec<&str> = layer_args.iter().map(|a| a.as_str()).collect();
    format!(
        "{imports}\nflow = zuko.flows.Flow([zuko.flows.GeneralCouplingTransform(mask=torch.tensor(mask), {}) for mask in [{}]], zuko.flows.RealNVP(features={d}).base)",
        layer_args.join(", "),
        masks.join(", ")
    )
}
