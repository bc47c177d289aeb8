//! normflows' Glow: `MultiscaleFlow(q0, flows, merges)` as the library's Glow example
//! builds it, with `L` levels, at `flows.{i}` (i = 0 the coarsest) `K` `GlowBlock`s
//! followed by a `Squeeze`, a `Merge` between levels, and a `DiagGaussian` base per level
//! (`q0.{i}.loc`, `q0.{i}.log_scale`, `(1, C, H, W)`).
//!
//! What the names and shapes say: `L` (the `q0.{i}`), `K` (the blocks of each level),
//! the hidden channels (the coupling network's first convolution), plain or LU 1×1
//! convolutions (`W` or `P`, `L`, `U`, `log_S`, `sign_S`), and the image: the finest
//! level's base holds half the channels its level ends with, at the level's resolution,
//! so the image is `(C/2, 2H, 2W)` for `q0.{L−1}` of shape `(1, C, H, W)` (`(C/4, 2H,
//! 2W)` for a single level, whose base takes all of them). `Squeeze` and `Merge` have no
//! tensors: the layout is taken to be the example's (blocks first, the squeeze last in
//! each level's list, channel splits), and every other shape is checked against it.
//!
//! normflows' flows run latent → data, and `log_prob` runs them backwards through their
//! `inverse`: from the finest level (`flows.{L−1}`) on, the squeeze, then the blocks
//! last to first, each `ActNorm⁻¹`, `Invertible1x1Conv⁻¹`, `AffineCouplingBlock⁻¹`;
//! then `Merge⁻¹` sends the second half of the channels to that level's base and the
//! first half on. That is this crate's `GlowConfig` level for level, with levels and
//! blocks numbered the other way ([`flow_glow::MultiScale`] factors out the second half
//! as well, so the latent is `[q0.{L−1} | … | q0.0]`, each flattened `(C, H, W)`: the
//! base's `loc` and `log_scale` are the levels' in that order). Per block:
//! - `ActNorm` `(s, t)`, data → latent `(x − t)·e^{−s}`: `(log_scale, bias) = (−s, −t)`;
//! - `Invertible1x1Conv`: data → latent applies `W = P·L·U` itself (its `inverse`);
//! - `AffineCouplingBlock` (channel split, `sigmoid` scale): `(x₂ − shift)·σ(s + 2)`
//!   with `shift`, `s` interleaved in the last convolution's output (even, odd
//!   channels): the shift rows are negated for this crate's `(x₂ + t)·exp(ls)`, and
//!   `exact_sigmoid` drops the `1e-3` this crate's sigmoid scale otherwise adds. The
//!   network is `conv 3×3 → ReLU → conv 1×1 → ReLU → conv 3×3` (`LeakyReLU(leaky)`,
//!   `leaky = 0` by default: ReLU unless the options say otherwise).
//!
//! `MultiscaleFlow.log_prob` adds no dequantisation or logit of its own (the example
//! scales and jitters in its data loader), and neither does the imported model; a
//! `transform` without tensors (normflows' `Logit`) cannot be seen here. The pixel
//! levels (for bits per dimension) are not in the weights: 256.

use std::collections::HashMap;

use candle::{DType, Device, Tensor};
use flow_glow::{GlowConfig, ImageShape, ScaleMap};
use flow_models::ModelConfig;

use super::{ImportOptions, Imported, Source, Weights};
use crate::IoError;

/// Whether the state dict is a `MultiscaleFlow` (per-level bases `q0.{i}.…`).
pub(crate) fn detect(w: &Weights) -> bool {
    !w.children("q0").is_empty()
}

pub(crate) fn import(w: &mut Weights, opts: &ImportOptions) -> Result<Imported, IoError> {
    let levels = w.children("q0");
    let n = levels.len();
    if let Some(i) = (0..n).find(|i| levels[*i] != *i) {
        return Err(IoError::MissingTensor {
            path: w.path().to_path_buf(),
            name: format!("q0.{i}.loc"),
        });
    }
    let flows = w.children("flows");
    if flows != (0..n).collect::<Vec<_>>() {
        return Err(w.invalid(format!(
            "{n} bases `q0.{{i}}` but flows at `flows.{{i}}` for i in {flows:?}: a \
             MultiscaleFlow has one list of flows per level"
        )));
    }

    // Blocks per level: `flows.{i}.0 … flows.{i}.{K−1}`, the same K everywhere (the
    // squeeze after them has no tensors).
    let mut depth = None;
    for i in 0..n {
        let blocks = w.children(&format!("flows.{i}"));
        let k = blocks.len();
        if k == 0 || blocks != (0..k).collect::<Vec<_>>() {
            return Err(w.unsupported(
                &format!("flows.{i}"),
                &format!(
                    "expected GlowBlocks at `flows.{i}.0` onwards, then a Squeeze (normflows' \
                     Glow layout)"
                ),
            ));
        }
        match depth {
            None => depth = Some(k),
            Some(d) if d != k => {
                return Err(w.invalid(format!(
                    "`flows.0` holds {d} GlowBlocks and `flows.{i}` {k}: every level needs the same number"
                )))
            }
            _ => {}
        }
    }
    let depth = depth.unwrap_or(0);

    // The image, from the finest level's base.
    let finest = format!("q0.{}.loc", n - 1);
    let base_shape = w.shape(&finest)?;
    let [1, c, h, wd] = base_shape[..] else {
        return Err(w.invalid(format!(
            "`{finest}` has shape {base_shape:?}: expected (1, C, H, W), a DiagGaussian over one \
             level's images (class-conditional bases are not supported)"
        )));
    };
    let level_channels = if n == 1 { c } else { 2 * c };
    if level_channels % 4 != 0 {
        return Err(w.invalid(format!(
            "`{finest}` has shape {base_shape:?}: the finest level ends with {level_channels} \
             channels, which a squeeze of whole images cannot give (a multiple of 4 is needed)"
        )));
    }
    let shape = ImageShape::new(level_channels / 4, 2 * h, 2 * wd);

    // Hidden channels and the 1×1 convolutions' form, from the first block.
    let first = format!("flows.{}.0.flows", n - 1);
    let net0 = format!("{first}.0.flows.1.param_map.net.0.weight");
    let hidden = *w.shape(&net0)?.first().unwrap_or(&0);
    let lu = !w.contains(&format!("{first}.1.W"));

    let cfg = GlowConfig::new(shape)
        .with_levels(n)
        .with_depth(depth)
        .with_hidden_channels(hidden)
        .with_activation(
            opts.activation
                .unwrap_or(Source::Normflows.default_activation()),
        )
        .with_scale(ScaleMap::Sigmoid)
        .with_exact_sigmoid(true)
        .with_lu(lu)
        .with_zero_init(false)
        .with_logit(None)
        .with_learn_base(true);
    let parts = cfg
        .latent_shapes()
        .map_err(|e| w.invalid(format!("`{finest}`: a Glow over {shape} images: {e}")))?;

    let mut tensors = HashMap::new();
    let (mut locs, mut log_scales) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (l, part) in parts.iter().enumerate() {
        // Our level l is normflows' `flows.{n−1−l}`.
        let i = n - 1 - l;
        let expected = [1, part.channels, part.height, part.width];
        locs.push(flat(w, &format!("q0.{i}.loc"), &expected)?);
        log_scales.push(flat(w, &format!("q0.{i}.log_scale"), &expected)?);

        // The level's images after its squeeze: a factored-out part has half of them.
        let level = if l + 1 < n {
            part.with_channels(2 * part.channels)
        } else {
            *part
        };
        for j in 0..depth {
            // normflows' block j runs (data → latent) as this crate's step K−1−j, whose
            // three layers follow the level's squeeze (index 0).
            let block = format!("flows.{i}.{j}.flows");
            let to = Step {
                level: l,
                first: 1 + 3 * (depth - 1 - j),
            };
            block_tensors(w, &block, to, level, hidden, lu, &mut tensors)?;
        }
    }
    let cat = |parts: Vec<Tensor>| Tensor::cat(&parts, 0).map_err(IoError::candle(w.path()));
    tensors.insert("base.loc".into(), cat(locs)?);
    tensors.insert("base.log_scale".into(), cat(log_scales)?);
    Ok(Imported::new(ModelConfig::glow(&cfg), tensors))
}

/// A tensor of `shape`, flattened.
fn flat(w: &mut Weights, name: &str, shape: &[usize]) -> Result<Tensor, IoError> {
    let t = w.float(name, shape)?;
    t.flatten_all().map_err(IoError::candle(w.path()))
}

/// Where a flow step's layers (`actnorm`, `inv-conv1x1`, `conv-coupling`) sit: level
/// `level` of the model's one `multiscale` layer, positions `first` to `first + 2`.
#[derive(Clone, Copy)]
struct Step {
    level: usize,
    first: usize,
}

/// One `GlowBlock` at `block` (`….flows`) over `level` images, as the step `to`.
fn block_tensors(
    w: &mut Weights,
    block: &str,
    to: Step,
    level: ImageShape,
    hidden: usize,
    lu: bool,
    out: &mut HashMap<String, Tensor>,
) -> Result<(), IoError> {
    let c = level.channels;
    let path = w.path().to_path_buf();
    let candle = || IoError::candle(&path);
    let layer = |k: usize| format!("layers.0.levels.{}.{}", to.level, to.first + k);

    // ActNorm: (−s, −t) per channel. An ActNorm that never saw a batch would
    // initialise itself on the first one normflows gives it: nothing to import.
    let done = w.float(&format!("{block}.2.data_dep_init_done"), &[])?;
    let done = done
        .to_dtype(DType::F64)
        .and_then(|t| t.to_scalar::<f64>())
        .map_err(candle())?;
    if done <= 0.0 {
        return Err(w.invalid(format!(
            "`{block}.2.data_dep_init_done` is 0: this ActNorm was never initialised (normflows \
             sets it from the first batch); run a batch through the model before saving it"
        )));
    }
    for (from, to) in [("s", "log_scale"), ("t", "bias")] {
        let t = w.float(&format!("{block}.2.{from}"), &[1, c, 1, 1])?;
        let t = t.reshape(c).and_then(|t| t.neg()).map_err(candle())?;
        out.insert(format!("{}.{to}", layer(0)), t);
    }

    // Invertible1x1Conv: the same W (normflows' `eye` is the identity, derived data).
    let conv = format!("{block}.1");
    if lu {
        for (from, to, shape) in [
            ("P", "p", vec![c, c]),
            ("L", "l", vec![c, c]),
            ("U", "u", vec![c, c]),
            ("log_S", "log_s", vec![c]),
            ("sign_S", "sign_s", vec![c]),
        ] {
            let t = w.float(&format!("{conv}.{from}"), &shape)?;
            out.insert(format!("{}.{to}", layer(1)), t);
        }
        w.skip(&format!("{conv}.eye"));
    } else {
        let t = w.float(&format!("{conv}.W"), &[c, c])?;
        out.insert(format!("{}.weight", layer(1)), t);
    }

    // AffineCouplingBlock (Split, AffineCoupling, Merge): the network at `flows.1`.
    let net = format!("{block}.0.flows.1.param_map.net");
    let kept = c.div_ceil(2);
    let last = w.shape(&format!("{net}.4.weight"))?;
    if last.first() == Some(&(c / 2)) {
        return Err(w.invalid(format!(
            "`{net}.4.weight` has shape {last:?}: an additive (scale=False) GlowBlock, which is \
             not supported"
        )));
    }
    let convs = [
        ("0", "conv_in", [hidden, kept, 3, 3]),
        ("2", "conv_hidden", [hidden, hidden, 1, 1]),
        ("4", "conv_out", [2 * (c / 2), hidden, 3, 3]),
    ];
    for (from, to, shape) in convs {
        let mut weight = w.float(&format!("{net}.{from}.weight"), &shape)?;
        let mut bias = w.float(&format!("{net}.{from}.bias"), &shape[..1])?;
        if to == "conv_out" {
            // Even output channels are normflows' shifts, subtracted: negated here.
            let signs: Vec<f32> = (0..shape[0])
                .map(|k| if k % 2 == 0 { -1.0 } else { 1.0 })
                .collect();
            let signs = Tensor::from_vec(signs, shape[0], &Device::Cpu).map_err(candle())?;
            bias = bias.mul(&signs).map_err(candle())?;
            weight = signs
                .reshape((shape[0], 1, 1, 1))
                .and_then(|s| weight.broadcast_mul(&s))
                .map_err(candle())?;
        }
        out.insert(format!("{}.{to}.weight", layer(2)), weight);
        out.insert(format!("{}.{to}.bias", layer(2)), bias);
    }
    Ok(())
}
