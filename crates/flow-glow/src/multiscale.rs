//! The multi-scale architecture (RealNVP §3.6, Glow §3): after each level but the last,
//! half of the channels leave the flow for the latent and the rest go on.

use std::sync::Arc;

use candle::{Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::{stages_of, Bijector, Chain, LayerSpec, Permute, SharedBatch, Stage};
use serde::{Deserialize, Serialize};

use crate::layer::{build_nested, nested_output_shape};
use crate::ImageShape;

/// A [`MultiScale`] layer: the shape of the images it takes and its levels, each a list
/// of layers applied (data to latent) in order to that level's images.
///
/// The layers of a level are this crate's kinds (except `multiscale`) or the fixed
/// `permute` / `reverse`; each image layer names the shape it takes, which must be the
/// shape the layers before it leave (a `squeeze` changes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiScaleConfig {
    pub shape: ImageShape,
    pub levels: Vec<Vec<LayerSpec>>,
}

impl MultiScaleConfig {
    pub fn new(shape: ImageShape, levels: Vec<Vec<LayerSpec>>) -> Self {
        Self { shape, levels }
    }

    /// The image shapes of the latent's parts, in the latent's order (see
    /// [`MultiScale`]), after checking every level; the message names the level and
    /// layer at fault.
    pub fn latent_shapes(&self) -> std::result::Result<Vec<ImageShape>, String> {
        Ok(self.walk()?.1)
    }

    /// The shape each level takes and leaves, and the latent's parts.
    #[allow(clippy::type_complexity)]
    fn walk(
        &self,
    ) -> std::result::Result<(Vec<(ImageShape, ImageShape)>, Vec<ImageShape>), String> {
        self.shape.validate()?;
        if self.levels.is_empty() {
            return Err("a multiscale layer needs at least one level".into());
        }
        let mut current = self.shape;
        let mut levels = Vec::with_capacity(self.levels.len());
        let mut parts = Vec::with_capacity(self.levels.len());
        for (l, level) in self.levels.iter().enumerate() {
            let input = current;
            for (i, spec) in level.iter().enumerate() {
                current = nested_output_shape(spec, current)
                    .map_err(|e| format!("multiscale level {l}, layer {i}: {e}"))?;
            }
            levels.push((input, current));
            if l + 1 < self.levels.len() {
                let c = current.channels;
                if c < 2 || !c.is_multiple_of(2) {
                    return Err(format!(
                        "multiscale level {l} ends with {current} images: factoring out half \
                         the channels needs an even number of them"
                    ));
                }
                parts.push(current.with_channels(c / 2));
                current = current.with_channels(c / 2);
            } else {
                parts.push(current);
            }
        }
        Ok((levels, parts))
    }
}

/// The permutation that takes rows holding the latent's parts (of `parts`' shapes) in
/// reverse order to rows holding them in order.
fn parts_reversed(parts: &[ImageShape]) -> Vec<usize> {
    let total: usize = parts.iter().map(|p| p.dim()).sum();
    let mut perm = Vec::with_capacity(total);
    let mut after = total;
    for part in parts {
        // Reversed, the parts after this one come before it.
        after -= part.dim();
        perm.extend(after..after + part.dim());
    }
    perm
}

#[derive(Debug)]
struct Level {
    chain: Chain,
    /// The shape the level takes.
    input: ImageShape,
    /// The shape the level leaves (before any factoring out).
    output: ImageShape,
}

/// A multi-scale flow on rows `(batch, C·H·W)`, as one bijector.
///
/// Data to latent, level `l` (of `n`) runs its layers on the images it is given; then,
/// for every level but the last, its output `(C_l, H_l, W_l)` is split by channels: the
/// first `C_l/2` go on to level `l + 1`, the last `C_l/2` are factored out — they pass
/// to the latent unchanged. The split and the concatenation are permutations, so
/// `log|det|` is the sum of the levels' log-dets.
///
/// **Latent layout**: the concatenation, in level order, of each level's factored-out
/// part and finally the last level's whole output,
///
/// `z = [out_0 | out_1 | … | out_{n−2} | final_{n−1}]`,
///
/// each part flattened in its own `(C, H, W)` order ([`MultiScale::latent_shapes`]
/// gives their shapes; [`MultiScaleConfig::latent_shapes`] the same before building).
/// The total is `C·H·W`, the input's. A base per level ("one prior per scale") is a base
/// over this concatenation: `N(0, I)` as it is, or a `DiagNormal` whose per-element
/// `loc` / `log_scale` slices are the levels' own diagonal Gaussians.
///
/// Tensors of layer `i` of level `l` live under `levels.{l}.{i}.`.
#[derive(Debug)]
pub struct MultiScale {
    shape: ImageShape,
    levels: Vec<Level>,
    latent: Vec<ImageShape>,
    /// The latent from the rows as the levels leave them when each maps the front of
    /// the row and the factored-out parts stay behind it (see [`Bijector::stages`]):
    /// `[final | out_{n−2} | … | out_0]` to the latent's `[out_0 | … | final]`.
    to_latent: Permute,
}

impl MultiScale {
    /// Checks the levels' shapes, then builds their layers under `vb`.
    pub fn new(cfg: &MultiScaleConfig, vb: VarBuilder) -> Result<Self> {
        let (shapes, latent) = cfg.walk().map_err(candle::Error::Msg)?;
        let to_latent = Permute::new(parts_reversed(&latent), vb.device())?;
        let vb = vb.pp("levels");
        let mut levels = Vec::with_capacity(cfg.levels.len());
        for (l, (specs, (input, output))) in cfg.levels.iter().zip(shapes).enumerate() {
            let vb = vb.pp(l);
            let layers = specs
                .iter()
                .enumerate()
                .map(|(i, spec)| build_nested(spec, vb.pp(i)))
                .collect::<Result<Vec<_>>>()?;
            levels.push(Level {
                chain: Chain::new(layers),
                input,
                output,
            });
        }
        Ok(Self {
            shape: cfg.shape,
            levels,
            latent,
            to_latent,
        })
    }

    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// The shapes of the latent's parts, in order.
    pub fn latent_shapes(&self) -> &[ImageShape] {
        &self.latent
    }

    /// Each level's layers.
    pub fn levels(&self) -> Vec<&Chain> {
        self.levels.iter().map(|l| &l.chain).collect()
    }

    /// Splits a level's output rows into `(going on, factored out)` rows.
    fn factor_out(level: &Level, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let img = level.output.to_image(y, "multiscale")?;
        let half = level.output.channels / 2;
        Ok((
            ImageShape::to_rows(&img.narrow(1, 0, half)?)?,
            ImageShape::to_rows(&img.narrow(1, half, half)?)?,
        ))
    }

    /// Data to latent.
    fn run_forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.shape.to_image(x, "multiscale")?;
        let mut h = x.clone();
        let mut log_det = Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?;
        let mut parts = Vec::with_capacity(self.levels.len());
        for (l, level) in self.levels.iter().enumerate() {
            let (y, ld) = level.chain.forward(&h)?;
            log_det = (log_det + ld)?;
            if l + 1 < self.levels.len() {
                let (next, out) = Self::factor_out(level, &y)?;
                parts.push(out);
                h = next;
            } else {
                parts.push(y);
            }
        }
        Ok((Tensor::cat(&parts, 1)?, log_det))
    }
}

impl Bijector for MultiScale {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.run_forward(x)
    }

    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.shape.to_image(z, "multiscale")?;
        let mut parts = Vec::with_capacity(self.latent.len());
        let mut offset = 0;
        for shape in &self.latent {
            parts.push(z.narrow(1, offset, shape.dim())?);
            offset += shape.dim();
        }
        let n = self.levels.len();
        let mut h = parts[n - 1].clone();
        let mut log_det = Tensor::zeros(z.dim(0)?, z.dtype(), z.device())?;
        for (l, level) in self.levels.iter().enumerate().rev() {
            if l + 1 < n {
                // Back in: the channels that went on first, the factored-out ones after.
                let half = level.output.with_channels(level.output.channels / 2);
                let going = half.to_image(&h, "multiscale")?;
                let out = half.to_image(&parts[l], "multiscale")?;
                h = ImageShape::to_rows(&Tensor::cat(&[going, out], 1)?)?;
            }
            let (x, ld) = level.chain.inverse(&h)?;
            log_det = (log_det + ld)?;
            h = x;
        }
        Ok((h, log_det))
    }

    fn set_training(&mut self, training: bool) {
        for level in &mut self.levels {
            level.chain.set_training(training);
        }
    }

    fn batch_statistics(&self) -> bool {
        self.levels.iter().any(|l| l.chain.batch_statistics())
    }

    fn share_batch(&mut self, shared: Option<Arc<dyn SharedBatch>>) {
        for level in &mut self.levels {
            level.chain.share_batch(shared.clone());
        }
    }

    fn buffers(&self) -> Vec<Tensor> {
        self.levels.iter().flat_map(|l| l.chain.buffers()).collect()
    }

    /// Each level's layers on the front of the row that level maps (the factored-out
    /// parts stay behind it), then the permutation into the latent's layout.
    fn stages(&self) -> Option<Vec<Stage<'_>>> {
        let mut stages: Vec<Stage<'_>> = self
            .levels
            .iter()
            .flat_map(|level| {
                let width = level.input.dim();
                stages_of(&level.chain)
                    .into_iter()
                    .map(move |s| s.within(width))
            })
            .collect();
        stages.push(Stage::whole(&self.to_latent));
        Some(stages)
    }

    /// Initialises each level on the images it receives from the (initialised) levels
    /// before it.
    fn initialize(&self, x: &Tensor, _context: Option<&Tensor>) -> Result<()> {
        self.shape.to_image(x, "multiscale")?;
        // Layer by layer, each output detached: initialisation needs one layer's
        // activations at a time, not the graph of the whole flow.
        let mut h = x.clone();
        for (l, level) in self.levels.iter().enumerate() {
            for layer in level.chain.layers() {
                layer.initialize(&h, None)?;
                h = layer.forward(&h)?.0.detach();
            }
            if l + 1 < self.levels.len() {
                h = Self::factor_out(level, &h)?.0;
            }
        }
        Ok(())
    }
}
