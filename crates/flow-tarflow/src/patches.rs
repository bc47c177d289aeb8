//! Images as sequences of patches: the order in which a block reads an image's values.

use flow_core::limits;
use flow_core::ImageShape;
use serde::{Deserialize, Serialize};

/// An image of `shape` cut into `patch × patch` patches: a sequence of
/// `(H/p)·(W/p)` tokens, row by row, each of the `p²·C` values of its patch in
/// `(C, p, p)` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patches {
    pub shape: ImageShape,
    pub patch: usize,
}

impl Patches {
    pub fn new(shape: ImageShape, patch: usize) -> Self {
        Self { shape, patch }
    }

    /// Checks the image and that the patch size divides its height and width.
    pub fn validate(&self) -> Result<(), String> {
        self.shape.validate()?;
        let p = self.patch;
        if p == 0 || !self.shape.height.is_multiple_of(p) || !self.shape.width.is_multiple_of(p) {
            return Err(format!(
                "patch size {p} does not divide the height and width of a {} image",
                self.shape
            ));
        }
        limits::check_at_most("values per patch", p.saturating_mul(p), limits::MAX_DIM)?;
        Ok(())
    }

    /// Tokens in the sequence, `(H/p)·(W/p)`.
    pub fn tokens(&self) -> usize {
        (self.shape.height / self.patch) * (self.shape.width / self.patch)
    }

    /// Values per token, `p²·C`.
    pub fn token_dim(&self) -> usize {
        self.patch * self.patch * self.shape.channels
    }

    /// For each position of the flattened sequence `(T, p²·C)`, the feature of the
    /// `(C, H, W)` row it holds; with `reversed`, the tokens run last to first.
    pub fn order(&self, reversed: bool) -> Vec<u32> {
        let ImageShape {
            channels,
            height,
            width,
        } = self.shape;
        let p = self.patch;
        let (tokens, across) = (self.tokens(), width / p);
        let mut order = Vec::with_capacity(self.shape.dim());
        for position in 0..tokens {
            let token = if reversed {
                tokens - 1 - position
            } else {
                position
            };
            let (row, col) = (token / across * p, token % across * p);
            for c in 0..channels {
                for dy in 0..p {
                    for dx in 0..p {
                        let feature = (c * height + row + dy) * width + col + dx;
                        order.push(feature as u32);
                    }
                }
            }
        }
        order
    }
}

/// The permutation that undoes `order`: `inverse[order[j]] = j`.
pub(crate) fn inverse(order: &[u32]) -> Vec<u32> {
    let mut inverse = vec![0u32; order.len()];
    for (j, &f) in order.iter().enumerate() {
        inverse[f as usize] = j as u32;
    }
    inverse
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_read_row_by_row_channels_first() {
        // A 2×4×4 image in 2×2 patches: 4 tokens of 8 values.
        let p = Patches::new(ImageShape::new(2, 4, 4), 2);
        assert_eq!((p.tokens(), p.token_dim()), (4, 8));
        let order = p.order(false);
        // Token 1 is the top-right patch: channel 0 then channel 1.
        assert_eq!(&order[8..16], &[2, 3, 6, 7, 18, 19, 22, 23]);
        let reversed = p.order(true);
        assert_eq!(&reversed[..8], &order[24..]);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..32).collect::<Vec<u32>>());
        let inv = inverse(&order);
        assert!((0..32).all(|f| order[inv[f] as usize] == f as u32));
    }

    #[test]
    fn a_patch_that_does_not_divide_the_image_is_refused() {
        let err = Patches::new(ImageShape::new(1, 8, 6), 4).validate();
        assert_eq!(
            err,
            Err("patch size 4 does not divide the height and width of a 1×8×6 image".into())
        );
        let err = Patches::new(ImageShape::new(1, 8, 8), 0).validate();
        assert_eq!(
            err,
            Err("patch size 0 does not divide the height and width of a 1×8×8 image".into())
        );
    }
}
