//! The invertible 1×1 convolution (Kingma & Dhariwal 2018, Glow §3.2), plain and
//! LU-parametrised.

use candle::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::Bijector;
use flow_nn::linalg::{self, Lu};
use serde::{Deserialize, Serialize};

use crate::{
    shape::{assign, per_row},
    ImageShape,
};

fn default_lu() -> bool {
    true
}

/// An [`InvConv1x1`] layer: its image shape and parametrisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvConv1x1Config {
    pub shape: ImageShape,
    /// `W = P·L·(U + diag(sign(s)·exp(log|s|)))` (the default, Glow's faster form)
    /// rather than a free `W`.
    #[serde(default = "default_lu")]
    pub lu: bool,
}

impl InvConv1x1Config {
    pub fn new(shape: ImageShape) -> Self {
        Self { shape, lu: true }
    }

    flow_core::with_setters! { with_lu: lu: bool }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.shape.validate()
    }
}

/// How `W` is held.
#[derive(Debug, Clone)]
enum Weight {
    /// `weight`, `(C, C)`, trainable.
    Plain {
        weight: Tensor,
    },
    Lu(LuWeight),
}

/// `W = P·L·(U + diag(sign_s·exp(log_s)))`.
#[derive(Debug, Clone)]
struct LuWeight {
    /// `(C, C)` permutation matrix, a buffer.
    p: Tensor,
    /// `(C, C)`, trainable; only the strictly lower triangle is used (`L` has a unit
    /// diagonal).
    l: Tensor,
    /// `(C, C)`, trainable; only the strictly upper triangle is used.
    u: Tensor,
    /// `(C,)`, trainable: `log|s|`.
    log_s: Tensor,
    /// `(C,)`, ±1, a buffer.
    sign_s: Tensor,
    /// Constant masks (not stored): strictly lower, strictly upper, identity.
    lower: Tensor,
    upper: Tensor,
    eye: Tensor,
}

impl LuWeight {
    /// `W` as candle's ops: the reference path of the fused op.
    fn reference(&self) -> Result<Tensor> {
        let (lt, ut) = self.triangles()?;
        // Buffers enter detached: constants, with no gradient to compute.
        self.p.detach().matmul(&lt)?.matmul(&ut)
    }

    /// `L` (unit lower) and `U + diag(sign_s·exp(log_s))`.
    fn triangles(&self) -> Result<(Tensor, Tensor)> {
        let lt = (self.l.mul(&self.lower)? + &self.eye)?;
        let diag = self
            .eye
            .broadcast_mul(&self.sign_s.detach().mul(&self.log_s.exp()?)?.unsqueeze(0)?)?;
        let ut = (self.u.mul(&self.upper)? + diag)?;
        Ok((lt, ut))
    }
}

/// A learned channel-mixing matrix applied at every pixel, data to latent
/// `z[:, h, w] = W · x[:, h, w]` with `W` a `C×C` matrix, on rows `(batch, C·H·W)`.
///
/// `log|det ∂z/∂x| = H·W·log|det W|`; the inverse applies `W⁻¹` with the negated
/// log-det.
///
/// - Plain (`lu: false`): tensor `weight` `(C, C)`, initialised as a random rotation
///   (Gram–Schmidt on a Gaussian draw from the `VarBuilder`'s initialiser);
///   `log|det W|` and `W⁻¹` come from an LU decomposition on the host
///   ([`linalg::log_abs_det`], [`linalg::inverse`], both differentiable: the gradient
///   of `log|det W|` is `W⁻ᵀ`).
/// - LU (`lu: true`): `W = P·L·(U + diag(sign_s · exp(log_s)))` with tensors `p`
///   (`(C, C)` permutation, buffer), `l` and `u` (`(C, C)`, trainable, masked to their
///   strict lower and upper triangles; `L` has a unit diagonal), `log_s` (`(C,)`,
///   trainable) and `sign_s` (`(C,)`, ±1, buffer), initialised as the LU factors of a
///   random rotation. `log|det W| = Σ log_s`; `W⁻¹ = (U + diag)⁻¹·L⁻¹·Pᵀ` with the
///   triangular inverses computed on the host each call.
///
/// The random initialisation happens only when the tensors are created (a fresh model);
/// tensors already in the `VarBuilder` (a loaded one) are used as they are.
#[derive(Debug, Clone)]
pub struct InvConv1x1 {
    shape: ImageShape,
    weight: Weight,
}

/// A row-major `n×n` host matrix as a tensor of `dtype` on `device`.
fn matrix(values: Vec<f64>, n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(values, (n, n), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

impl InvConv1x1 {
    /// Reads (or creates, as a random rotation) the weight under `vb`.
    pub fn new(cfg: &InvConv1x1Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle::Error::Msg)?;
        let c = cfg.shape.channels;
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let gaussian = candle_nn::init::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let weight = if cfg.lu {
            // The draw for the rotation is taken from the variable `u` itself, so that a
            // seeded VarBuilder makes it reproducible without a tensor of its own.
            let fresh = !vb.contains_tensor("u");
            let p = vb.get_with_hints((c, c), "p", candle_nn::init::ZERO)?;
            let l = vb.get_with_hints((c, c), "l", candle_nn::init::ZERO)?;
            let u = vb.get_with_hints((c, c), "u", gaussian)?;
            let log_s = vb.get_with_hints(c, "log_s", candle_nn::init::ZERO)?;
            let sign_s = vb.get_with_hints(c, "sign_s", candle_nn::init::ONE)?;
            if fresh {
                let draw = u.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                let q = linalg::orthogonal(&draw, c);
                let [pm, lm, um] = Lu::new(&q, c).map_err(candle::Error::Msg)?.factors();
                let diag: Vec<f64> = (0..c).map(|i| um[i * c + i]).collect();
                let strict_u: Vec<f64> = (0..c * c)
                    .map(|k| if k % c > k / c { um[k] } else { 0.0 })
                    .collect();
                let strict_l: Vec<f64> = (0..c * c)
                    .map(|k| if k % c < k / c { lm[k] } else { 0.0 })
                    .collect();
                let vector = |v: Vec<f64>| {
                    Tensor::from_vec(v, c, &Device::Cpu)?
                        .to_dtype(dtype)?
                        .to_device(&device)
                };
                assign(&p, &matrix(pm, c, dtype, &device)?)?;
                assign(&l, &matrix(strict_l, c, dtype, &device)?)?;
                assign(&u, &matrix(strict_u, c, dtype, &device)?)?;
                assign(
                    &log_s,
                    &vector(diag.iter().map(|d| d.abs().ln()).collect())?,
                )?;
                assign(&sign_s, &vector(diag.iter().map(|d| d.signum()).collect())?)?;
            }
            let mask = |keep: fn(usize, usize) -> bool| {
                let v = (0..c * c)
                    .map(|k| if keep(k / c, k % c) { 1.0 } else { 0.0 })
                    .collect();
                matrix(v, c, dtype, &device)
            };
            Weight::Lu(LuWeight {
                p,
                l,
                u,
                log_s,
                sign_s,
                lower: mask(|i, j| i > j)?,
                upper: mask(|i, j| i < j)?,
                eye: mask(|i, j| i == j)?,
            })
        } else {
            let fresh = !vb.contains_tensor("weight");
            let weight = vb.get_with_hints((c, c), "weight", gaussian)?;
            if fresh {
                let draw = weight
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                let q = linalg::orthogonal(&draw, c);
                assign(&weight, &matrix(q, c, dtype, &device)?)?;
            }
            Weight::Plain { weight }
        };
        Ok(Self {
            shape: cfg.shape,
            weight,
        })
    }

    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// Whether `W` is LU-parametrised.
    pub fn is_lu(&self) -> bool {
        matches!(self.weight, Weight::Lu(_))
    }

    /// `W`, `(C, C)`: row `i` gives output channel `i`. The LU form's takes one fused
    /// op where [`fused`](flow_kernels::fused) allows
    /// [`Op::LuWeight`](flow_kernels::Op::LuWeight), else candle's ops.
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Plain { weight } => Ok(weight.clone()),
            Weight::Lu(w) if flow_kernels::fused(flow_kernels::Op::LuWeight, &w.l) => {
                flow_kernels::lu_weight::lu_weight_fused(&w.p, &w.l, &w.u, &w.log_s, &w.sign_s)
            }
            Weight::Lu(w) => w.reference(),
        }
    }

    /// `W⁻¹`, `(C, C)`, computed on the host (from the triangular factors in the LU
    /// form); differentiable.
    pub fn inverse_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Plain { weight } => linalg::inverse(weight),
            Weight::Lu(w) => {
                let (lt, ut) = w.triangles()?;
                // W⁻¹ = U⁻¹·L⁻¹·P⁻¹ and a permutation's inverse is its transpose.
                linalg::inverse(&ut)?
                    .matmul(&linalg::inverse(&lt)?)?
                    .matmul(&w.p.detach().t()?)
            }
        }
    }

    /// `log|det W|`, a scalar.
    pub fn log_abs_det(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Plain { weight } => linalg::log_abs_det(weight),
            Weight::Lu(w) => w.log_s.sum_all(),
        }
    }

    /// `m · x` at every pixel of rows `x`, with log-det `sign·H·W·log|det W|`.
    fn apply(&self, m: &Tensor, x: &Tensor, sign: f64) -> Result<(Tensor, Tensor)> {
        let img = self.shape.to_image(x, "inv-conv1x1")?;
        let (b, c) = (img.dim(0)?, self.shape.channels);
        let out = if flow_kernels::fused(flow_kernels::Op::Conv, &img) {
            // A 1×1 convolution: one matrix product over the whole batch, where the
            // batched product below runs one small product per image.
            flow_kernels::conv::conv2d_fused(&img, &m.reshape((c, c, 1, 1))?, None, None)?
                .reshape((b, ()))?
        } else {
            let cols = img.reshape((b, c, self.shape.pixels()))?;
            m.broadcast_matmul(&cols)?.reshape((b, ()))?
        };
        let log_det = self
            .log_abs_det()?
            .affine(sign * self.shape.pixels() as f64, 0.0)?;
        Ok((out, per_row(&log_det, b)?))
    }
}

impl Bijector for InvConv1x1 {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(&self.weight()?, x, 1.0)
    }

    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(&self.inverse_weight()?, z, -1.0)
    }

    /// `p` and `sign_s` of the LU form; none for the plain one.
    fn buffers(&self) -> Vec<Tensor> {
        match &self.weight {
            Weight::Plain { .. } => Vec::new(),
            Weight::Lu(w) => vec![w.p.clone(), w.sign_s.clone()],
        }
    }
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Tensor};
    use candle_nn::VarMap;
    use flow_core::seeded_var_builder;

    use super::{InvConv1x1, InvConv1x1Config, Weight};
    use crate::ImageShape;

    /// The fused weight op (which CUDA takes) against the layer's own candle ops on the
    /// CPU: `W` and the gradients of `l`, `u` and `log_s`, with every entry of `l` and
    /// `u` random (the triangles the weight does not use included).
    #[test]
    fn the_fused_weight_matches_the_plain_ops() -> candle::Result<()> {
        let dev = Device::Cpu;
        for c in [1, 4, 7] {
            let varmap = VarMap::new();
            let cfg = InvConv1x1Config::new(ImageShape::new(c, 2, 2));
            let layer = InvConv1x1::new(&cfg, seeded_var_builder(&varmap, 4, DType::F64, &dev))?;
            let Weight::Lu(w) = &layer.weight else {
                panic!("the default layer is LU-parametrised");
            };
            let mut set = 0;
            for (name, var) in varmap.data().lock().expect("varmap").iter() {
                if name == "l" || name == "u" || name == "log_s" {
                    var.set(&Tensor::randn(0.0, 0.5, var.shape(), &dev)?.to_dtype(DType::F64)?)?;
                    set += 1;
                }
            }
            assert_eq!(set, 3, "the factors' names");
            let r = Tensor::randn(0.0, 1.0, (c, c), &dev)?.to_dtype(DType::F64)?;
            let fused =
                flow_kernels::lu_weight::lu_weight_fused(&w.p, &w.l, &w.u, &w.log_s, &w.sign_s)?;
            let plain = w.reference()?;
            let gap = |a: &Tensor, b: &Tensor| -> candle::Result<f64> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f64>()
            };
            assert!(gap(&fused, &plain)? < 1e-12, "W, {c} channels");
            let gf = (fused * &r)?.sum_all()?.backward()?;
            let gp = (plain * &r)?.sum_all()?.backward()?;
            for (name, t) in [("l", &w.l), ("u", &w.u), ("log_s", &w.log_s)] {
                let (a, b) = (gf.get(t).expect("∂"), gp.get(t).expect("∂"));
                assert!(gap(a, b)? < 1e-12, "∂{name}, {c} channels");
            }
            for buffer in [&w.p, &w.sign_s] {
                assert!(gf.get(buffer).is_none(), "a buffer got a gradient");
            }
        }
        Ok(())
    }
}
