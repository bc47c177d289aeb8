//! Squeeze (space to depth) and its inverse (RealNVP §3.6).

use candle::{Result, Tensor};
use flow_core::Bijector;
use serde::{Deserialize, Serialize};

use crate::ImageShape;

/// A [`Squeeze`] or [`Unsqueeze`] layer: the shape of the images it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqueezeConfig {
    pub shape: ImageShape,
}

impl SqueezeConfig {
    pub fn new(shape: ImageShape) -> Self {
        Self { shape }
    }
}

/// Space to depth, data to latent: `(C, H, W) → (4C, H/2, W/2)`, each 2×2 block of
/// pixels becoming four channels:
///
/// `z[4c + 2i + j, h, w] = x[c, 2h + i, 2w + j]`, `i, j ∈ {0, 1}`,
///
/// i.e. `x.view(C, H/2, 2, W/2, 2).permute(0, 2, 4, 1, 3)` — the order of normflows'
/// `Squeeze` (run data to latent) and of Glow's `squeeze2d`. A permutation of the
/// features: `log|det| = 0`. Built only for an even height and width.
#[derive(Debug, Clone, Copy)]
pub struct Squeeze {
    shape: ImageShape,
    out: ImageShape,
}

impl Squeeze {
    /// A squeeze of `cfg.shape` images; an odd height or width is an error.
    pub fn new(cfg: &SqueezeConfig) -> Result<Self> {
        let out = cfg.shape.squeezed().map_err(candle::Error::Msg)?;
        Ok(Self {
            shape: cfg.shape,
            out,
        })
    }

    /// The shape it takes.
    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// The shape it gives, `(4C, H/2, W/2)`.
    pub fn output_shape(&self) -> ImageShape {
        self.out
    }
}

/// `(C, H, W) → (4C, H/2, W/2)` on rows.
fn squeeze(x: &Tensor, shape: ImageShape) -> Result<Tensor> {
    let (c, h, w) = (shape.channels, shape.height, shape.width);
    let img = shape.to_image(x, "squeeze")?;
    let b = img.dim(0)?;
    img.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 3, 5, 2, 4))?
        .contiguous()?
        .reshape((b, ()))
}

/// `(4C, H/2, W/2) → (C, H, W)` on rows, `shape` being `(C, H, W)`.
fn unsqueeze(z: &Tensor, shape: ImageShape, squeezed: ImageShape) -> Result<Tensor> {
    let (c, h, w) = (shape.channels, shape.height, shape.width);
    let img = squeezed.to_image(z, "unsqueeze")?;
    let b = img.dim(0)?;
    img.reshape((b, c, 2, 2, h / 2, w / 2))?
        .permute((0, 1, 4, 2, 5, 3))?
        .contiguous()?
        .reshape((b, ()))
}

fn zeros(x: &Tensor) -> Result<Tensor> {
    Tensor::zeros(x.dim(0)?, x.dtype(), x.device())
}

impl Bijector for Squeeze {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((squeeze(x, self.shape)?, zeros(x)?))
    }

    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((unsqueeze(z, self.shape, self.out)?, zeros(z)?))
    }
}

/// Depth to space, data to latent: `(4C, H, W) → (C, 2H, 2W)`, the inverse of
/// [`Squeeze`] (`z[c, 2h + i, 2w + j] = x[4c + 2i + j, h, w]`). `log|det| = 0`. Built
/// only for a multiple of 4 channels.
#[derive(Debug, Clone, Copy)]
pub struct Unsqueeze {
    /// The squeeze it undoes: of the `(C/4, 2H, 2W)` images this layer gives.
    squeeze: Squeeze,
}

impl Unsqueeze {
    /// An unsqueeze of `cfg.shape` images; channels not a multiple of 4 are an error.
    pub fn new(cfg: &SqueezeConfig) -> Result<Self> {
        let out = cfg.shape.unsqueezed().map_err(candle::Error::Msg)?;
        Ok(Self {
            squeeze: Squeeze::new(&SqueezeConfig::new(out))?,
        })
    }

    pub fn shape(&self) -> ImageShape {
        self.squeeze.output_shape()
    }

    /// The shape it gives, `(C/4, 2H, 2W)`.
    pub fn output_shape(&self) -> ImageShape {
        self.squeeze.shape()
    }
}

impl Bijector for Unsqueeze {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.squeeze.inverse(x)
    }

    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.squeeze.forward(z)
    }
}
