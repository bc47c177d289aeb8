use candle::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use serde::{Deserialize, Serialize};

/// How the conditioner's raw output `s` becomes the log-scale of an affine coupling.
///
/// Bounding the log-scale keeps `exp(±s)` finite, so the inverse cannot explode on
/// points far from the training data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ScaleMap {
    /// `s` unchanged: `scale = exp(s)` (the original RealNVP; unbounded).
    Exp,
    /// `s / (1 + |s| / clamp)`: smooth, identity near 0, bounded by `±clamp`.
    SoftClamp { clamp: f64 },
    /// `clamp · tanh(s / clamp)`.
    Tanh { clamp: f64 },
    /// `clamp · 0.636 · atan(s)`: bounded by about `±clamp` (FrEIA's Glow couplings).
    Atan { clamp: f64 },
    /// `log(sigmoid(s + 2) + 1e-3)` (as in nflows' affine coupling).
    Sigmoid,
    /// `log(softplus(s) + 1e-3)` (as in nflows' masked affine autoregressive layer).
    Softplus,
}

impl Default for ScaleMap {
    fn default() -> Self {
        Self::SoftClamp { clamp: 3.0 }
    }
}

impl ScaleMap {
    /// Maps raw conditioner outputs to log-scales (same shape).
    pub fn log_scale(&self, s: &Tensor) -> Result<Tensor> {
        match *self {
            Self::Exp => Ok(s.clone()),
            Self::SoftClamp { clamp } => s.div(&(s.abs()?.affine(1.0 / clamp, 1.0))?),
            Self::Tanh { clamp } => s.affine(1.0 / clamp, 0.0)?.tanh()?.affine(clamp, 0.0),
            Self::Atan { clamp } => s.apply(&atan)?.affine(clamp * 0.636, 0.0),
            Self::Sigmoid => candle_nn::ops::sigmoid(&s.affine(1.0, 2.0)?)?
                .affine(1.0, 1e-3)?
                .log(),
            // softplus(s) = max(s, 0) + log(1 + e^{−|s|}), stable for large |s|.
            Self::Softplus => (s.relu()? + s.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?
                .affine(1.0, 1e-3)?
                .log(),
        }
    }

    /// The log-scale of one raw output and its derivative: the scalar form of
    /// [`log_scale`](Self::log_scale), for fused kernels.
    pub fn scalar<T: num_traits::Float>(&self, s: T) -> (T, T) {
        let c = |v: f64| T::from(v).unwrap_or_else(T::zero);
        let one = T::one();
        match *self {
            Self::Exp => (s, one),
            Self::SoftClamp { clamp } => {
                let d = one + s.abs() / c(clamp);
                (s / d, one / (d * d))
            }
            Self::Tanh { clamp } => {
                let y = (s / c(clamp)).tanh();
                (c(clamp) * y, one - y * y)
            }
            Self::Atan { clamp } => {
                let k = c(clamp * 0.636);
                (k * s.atan(), k / (one + s * s))
            }
            Self::Sigmoid => {
                let p = one / (one + (-(s + c(2.0))).exp());
                let q = p + c(1e-3);
                (q.ln(), p * (one - p) / q)
            }
            Self::Softplus => {
                let softplus = s.max(T::zero()) + (-s.abs()).exp().ln_1p();
                let q = softplus + c(1e-3);
                let sigmoid = one / (one + (-s).exp());
                (q.ln(), sigmoid / q)
            }
        }
    }
}

/// Element-wise arctangent with its gradient `1 / (1 + x²)`; candle has no built-in.
struct Atan;

impl CustomOp1 for Atan {
    fn name(&self) -> &'static str {
        "atan"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        // `atan` below makes its input contiguous.
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle::bail!("atan expects a contiguous tensor");
        };
        let out = match storage {
            CpuStorage::F32(d) => CpuStorage::F32(d[start..end].iter().map(|v| v.atan()).collect()),
            CpuStorage::F64(d) => CpuStorage::F64(d[start..end].iter().map(|v| v.atan()).collect()),
            _ => candle::bail!("atan is implemented for f32 and f64 only"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let denom = arg.sqr()?.affine(1.0, 1.0)?;
        Ok(Some(grad_res.div(&denom)?))
    }
}

/// `atan` on any device: computed on the CPU where no kernel exists.
fn atan(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.device().is_cpu() {
        x.apply_op1(Atan)
    } else {
        x.to_device(&candle::Device::Cpu)?
            .apply_op1(Atan)?
            .to_device(x.device())
    }
}
