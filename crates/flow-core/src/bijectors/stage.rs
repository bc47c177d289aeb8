use candle::{Result, Tensor};

use super::Bijector;

/// One layer of a bijector taken apart into the sequence of layers it applies (see
/// [`Bijector::stages`]): `layer` maps the first `width` features of the row (all of
/// them when `None`) and passes the others through unchanged.
///
/// A multi-scale flow is such a sequence: after each level, the factored-out features
/// stop at the end of the row and the later levels map a shorter front part.
#[derive(Debug, Clone, Copy)]
pub struct Stage<'a> {
    pub layer: &'a dyn Bijector,
    pub width: Option<usize>,
}

impl<'a> Stage<'a> {
    /// A stage over the whole row.
    pub fn whole(layer: &'a dyn Bijector) -> Self {
        Self { layer, width: None }
    }

    /// The stage restricted to the first `width` features: within a part of the row
    /// that narrow, a stage keeps the narrower of the two widths.
    pub fn within(self, width: usize) -> Self {
        Self {
            width: Some(self.width.map_or(width, |w| w.min(width))),
            ..self
        }
    }

    /// Splits rows into the part the layer maps and the part it passes through (`None`
    /// when it maps the whole row).
    pub fn split(&self, h: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let d = h.dim(1)?;
        match self.width {
            Some(w) if w < d => Ok((h.narrow(1, 0, w)?, Some(h.narrow(1, w, d - w)?))),
            _ => Ok((h.clone(), None)),
        }
    }

    /// Puts back together what [`split`](Self::split) took apart.
    pub fn join(mapped: Tensor, rest: Option<&Tensor>) -> Result<Tensor> {
        match rest {
            Some(rest) => Tensor::cat(&[&mapped, rest], 1),
            None => Ok(mapped),
        }
    }

    /// The layer's forward pass on its part of the rows `h`, the rest passed through:
    /// `(output rows, log-det)`. Composed in order, the stages of a bijector give its
    /// `forward`.
    pub fn forward(&self, h: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (mapped, rest) = self.split(h)?;
        let (y, log_det) = match context {
            Some(c) => self.layer.forward_with_context(&mapped, c)?,
            None => self.layer.forward(&mapped)?,
        };
        Ok((Self::join(y, rest.as_ref())?, log_det))
    }
}

/// The stages of `bijector`: its own ([`Bijector::stages`]), or the bijector itself as
/// the one stage.
pub fn stages_of(bijector: &dyn Bijector) -> Vec<Stage<'_>> {
    bijector
        .stages()
        .unwrap_or_else(|| vec![Stage::whole(bijector)])
}
