//! Images as flat rows: the shape `(channels, height, width)` every image layer reads
//! its rows in, and what an image model records about its data.

use std::fmt;

use candle::{bail, Result, Tensor};
use serde::{Deserialize, Serialize};

/// The pixel levels of 8-bit images, the default of every image family.
pub const DEFAULT_PIXEL_LEVELS: u32 = 256;

/// The shape `(channels, height, width)` of one image.
///
/// Every layer of this crate takes flat rows `(batch, C·H·W)` — so that `Flow`, `Chain`,
/// checkpoints and training work on images unchanged — and reads each row in
/// `(C, H, W)` order, the order of a contiguous NCHW tensor: feature
/// `c·H·W + h·W + w` is pixel `(h, w)` of channel `c`.
///
/// Flat, non-image data fit the same layers as `C = D, H = W = 1` ([`ImageShape::flat`]):
/// per-channel statistics are then per-feature ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl fmt::Display for ImageShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}×{}×{}", self.channels, self.height, self.width)
    }
}

impl ImageShape {
    pub fn new(channels: usize, height: usize, width: usize) -> Self {
        Self {
            channels,
            height,
            width,
        }
    }

    /// `dim` features seen as `dim` channels of one pixel.
    pub fn flat(dim: usize) -> Self {
        Self::new(dim, 1, 1)
    }

    /// Features per image, `C·H·W`.
    pub fn dim(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Pixels per channel, `H·W`: the factor by which a per-channel log-scale enters a
    /// log-determinant.
    pub fn pixels(&self) -> usize {
        self.height * self.width
    }

    /// Checks that no side is zero and that the features, `C·H·W` in checked
    /// arithmetic, are within [`MAX_DIM`](crate::limits::MAX_DIM); after it,
    /// [`dim`](Self::dim) and [`pixels`](Self::pixels) cannot overflow.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sides = [self.channels, self.height, self.width];
        if sides.contains(&0) {
            return Err(format!("an image needs non-zero sides, got {self}"));
        }
        crate::limits::checked_product("an image", &sides, crate::limits::MAX_DIM)?;
        Ok(())
    }

    /// The shape after a squeeze, `(4C, H/2, W/2)`; odd sides are an error.
    pub fn squeezed(&self) -> std::result::Result<Self, String> {
        self.validate()?;
        if !self.height.is_multiple_of(2) || !self.width.is_multiple_of(2) {
            return Err(format!(
                "squeezing a {self} image needs an even height and width"
            ));
        }
        Ok(Self::new(
            4 * self.channels,
            self.height / 2,
            self.width / 2,
        ))
    }

    /// The shape after an unsqueeze, `(C/4, 2H, 2W)`; channels not a multiple of 4 are
    /// an error.
    pub fn unsqueezed(&self) -> std::result::Result<Self, String> {
        self.validate()?;
        if !self.channels.is_multiple_of(4) {
            return Err(format!(
                "unsqueezing a {self} image needs a multiple of 4 channels"
            ));
        }
        Ok(Self::new(
            self.channels / 4,
            2 * self.height,
            2 * self.width,
        ))
    }

    /// The same pixels with `channels` channels.
    pub fn with_channels(&self, channels: usize) -> Self {
        Self::new(channels, self.height, self.width)
    }

    /// Flat rows `(batch, C·H·W)` as images `(batch, C, H, W)`; any other shape is an
    /// error naming `what`.
    pub fn to_image(&self, x: &Tensor, what: &str) -> Result<Tensor> {
        let (b, d) = match x.dims() {
            [b, d] => (*b, *d),
            dims => bail!("{what} takes rows (batch, {}), got {dims:?}", self.dim()),
        };
        if d != self.dim() {
            bail!(
                "{what} of a {self} image takes rows of {} features, got {d}",
                self.dim()
            );
        }
        x.reshape((b, self.channels, self.height, self.width))
    }

    /// Images `(batch, C, H, W)` back to flat rows `(batch, C·H·W)`.
    pub fn to_rows(x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        x.contiguous()?.reshape((b, ()))
    }
}

/// What an image model records about its data, readable from the recipe of any image
/// family (`serde_json::from_value::<ImageInfo>(recipe)`): the image shape and the
/// number of values a pixel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub shape: ImageShape,
    pub pixel_levels: u32,
}
