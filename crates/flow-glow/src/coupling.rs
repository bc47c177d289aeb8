//! The affine coupling layer with a convolutional conditioner (RealNVP §3.3–3.4, Glow
//! §3.3).

use candle::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use flow_core::{limits, recompute_by_inverse, Bijector};
use flow_nn::{Activation, ScaleMap};
use serde::{Deserialize, Serialize};

use crate::ImageShape;

/// Which part of the image a [`ConvCoupling`] keeps (and conditions on) and which it
/// transforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CouplingMask {
    /// RealNVP's spatial checkerboard: keeps the pixels with `h + w` even (all their
    /// channels), transforms those with `h + w` odd.
    Checkerboard,
    /// The other colour: keeps `h + w` odd, transforms `h + w` even.
    CheckerboardInv,
    /// Keeps the first `⌈C/2⌉` channels and transforms the other `⌊C/2⌋` (Glow's
    /// split, and RealNVP's channel-wise mask).
    Channel,
    /// Keeps the last `⌊C/2⌋` channels and transforms the first `⌈C/2⌉`.
    ChannelInv,
}

impl CouplingMask {
    /// The mask that transforms what this one keeps.
    pub fn flipped(self) -> Self {
        match self {
            Self::Checkerboard => Self::CheckerboardInv,
            Self::CheckerboardInv => Self::Checkerboard,
            Self::Channel => Self::ChannelInv,
            Self::ChannelInv => Self::Channel,
        }
    }

    /// Whether it splits channels (rather than pixels).
    pub fn is_channel(self) -> bool {
        matches!(self, Self::Channel | Self::ChannelInv)
    }

    /// `(kept, transformed)` channel counts as the conditioner sees them: its input and
    /// half its output.
    fn channels(self, c: usize) -> (usize, usize) {
        match self {
            Self::Checkerboard | Self::CheckerboardInv => (c, c),
            Self::Channel => (c.div_ceil(2), c / 2),
            Self::ChannelInv => (c / 2, c.div_ceil(2)),
        }
    }
}

fn default_hidden() -> usize {
    512
}
fn default_activation() -> Activation {
    Activation::Relu
}
fn default_scale() -> ScaleMap {
    ScaleMap::Sigmoid
}
fn default_zero_init() -> bool {
    true
}

/// A [`ConvCoupling`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConvCouplingConfig {
    pub shape: ImageShape,
    pub mask: CouplingMask,
    /// Channels of the two hidden feature maps.
    #[serde(default = "default_hidden")]
    pub hidden_channels: usize,
    #[serde(default = "default_activation")]
    pub activation: Activation,
    /// Raw scale output to log-scale: `sigmoid` (Glow's `σ(s + 2)`, here as
    /// `log(σ(s + 2) + 1e-3)`), `tanh` (RealNVP's bounded scale), …
    #[serde(default = "default_scale")]
    pub scale: ScaleMap,
    /// Start the last convolution at zero, so the layer starts as the identity (Glow).
    #[serde(default = "default_zero_init")]
    pub zero_init: bool,
    /// With the `sigmoid` scale: `log σ(s + 2)` itself, without the `1e-3` that
    /// [`ScaleMap::Sigmoid`] adds inside the log — normflows' Glow coupling has none,
    /// and the `1e-3` alone moves an imported model's log-probs by ~1e-2. Omitted from
    /// the JSON when false, so existing configurations read and write unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exact_sigmoid: bool,
}

impl ConvCouplingConfig {
    /// Glow's defaults: 512 hidden channels, ReLU, sigmoid scale, zero-initialised
    /// output.
    pub fn new(shape: ImageShape, mask: CouplingMask) -> Self {
        Self {
            shape,
            mask,
            hidden_channels: default_hidden(),
            activation: default_activation(),
            scale: default_scale(),
            zero_init: default_zero_init(),
            exact_sigmoid: false,
        }
    }

    flow_core::with_setters! {
        with_hidden_channels: hidden_channels: usize,
        with_activation: activation: Activation,
        with_scale: scale: ScaleMap,
        with_zero_init: zero_init: bool,
        with_exact_sigmoid: exact_sigmoid: bool,
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.shape.validate()?;
        if self.hidden_channels == 0 {
            return Err("a coupling needs at least one hidden channel".into());
        }
        let h = self.hidden_channels;
        limits::check_at_most("hidden channels", h, limits::MAX_HIDDEN)?;
        // The convolutions' kernels: 3×3 between the channels and the hidden ones (at
        // most twice the channels out), 1×1 from hidden to hidden.
        let c = self.shape.channels;
        limits::checked_product(
            "a convolution kernel",
            &[2, c, h, 9],
            limits::MAX_TENSOR_ELEMENTS,
        )?;
        limits::checked_product("a convolution kernel", &[h, h], limits::MAX_TENSOR_ELEMENTS)?;
        if self.mask.is_channel() && self.shape.channels < 2 {
            return Err(format!(
                "a channel-wise coupling needs at least 2 channels, got a {} image",
                self.shape
            ));
        }
        if !self.mask.is_channel() && self.shape.pixels() < 2 {
            return Err(format!(
                "a checkerboard coupling needs at least 2 pixels, got a {} image",
                self.shape
            ));
        }
        let clamp = match self.scale {
            ScaleMap::SoftClamp { clamp } | ScaleMap::Tanh { clamp } | ScaleMap::Atan { clamp } => {
                clamp
            }
            ScaleMap::Exp | ScaleMap::Sigmoid | ScaleMap::Softplus => 1.0,
        };
        if !(clamp.is_finite() && clamp > 0.0) {
            return Err(format!("clamp must be positive, got {clamp}"));
        }
        if self.exact_sigmoid && self.scale != ScaleMap::Sigmoid {
            return Err(format!(
                "`exact_sigmoid` needs the sigmoid scale, got {:?}",
                self.scale
            ));
        }
        Ok(())
    }
}

/// An affine coupling over images with a convolutional conditioner, data to latent:
/// with `x_a` the part the mask keeps and `x_b` the part it transforms,
///
/// `z_a = x_a`, `z_b = (x_b + t(x_a)) ⊙ exp(ls(x_a))`, `ls = scale_map(s)`,
///
/// and `log|det ∂z/∂x| = Σ ls` over the transformed elements. The inverse is
/// `x_b = z_b ⊙ exp(−ls) − t` with the negated log-det. (Shift before scale is Glow's
/// order, `(x + t)·σ(s + 2)`.) Rows are `(batch, C·H·W)`.
///
/// The conditioner (`t` and `s` from `x_a`) is
/// `conv 3×3 → act → conv 1×1 → act → conv 3×3` (padding 1 for the 3×3 ones), whose
/// last convolution starts at zero when `zero_init`. Its input and output:
/// - channel masks: `x_a` is the kept channels, the output has `2·C_b` channels for the
///   `C_b` transformed ones;
/// - checkerboard masks: `x_a` is the whole image with the transformed pixels zeroed
///   (`C` channels), the output has `2·C` channels, of which only the transformed
///   pixels are used.
///
/// Output layout, interleaved as Glow's `h[:, 0::2], h[:, 1::2]`: channel `2k` is the
/// shift `t` and channel `2k + 1` the raw scale `s` of transformed channel `k`.
///
/// Tensors: `conv_in`, `conv_hidden`, `conv_out`, each with `weight`
/// `(out, in, k, k)` and `bias` `(out,)`.
#[derive(Debug, Clone)]
pub struct ConvCoupling {
    shape: ImageShape,
    mask: CouplingMask,
    activation: Activation,
    scale: ScaleMap,
    exact_sigmoid: bool,
    conv_in: Conv2d,
    conv_hidden: Conv2d,
    conv_out: Conv2d,
    /// `(1, 1, H, W)`, 1 on the kept pixels, for checkerboard masks.
    pixel_mask: Option<Tensor>,
}

/// `act(conv(x))` for a same-padded stride-1 convolution of the conditioner (`act`
/// none for the last): the fused kernel, activation included, where
/// [`flow_kernels::fused`] allows it (the same values and gradients up to rounding,
/// without candle's per-element convolution backward and the activation's own graph
/// node), else `candle_nn`'s convolution and the activation's candle ops.
fn conv(layer: &Conv2d, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
    if flow_kernels::fused(flow_kernels::Op::Conv, x) {
        flow_kernels::conv::conv2d_fused(x, layer.weight(), layer.bias(), act)
    } else {
        let y = layer.forward(x)?;
        match act {
            Some(a) => a.apply(&y),
            None => Ok(y),
        }
    }
}

/// A `k×k` convolution initialised as PyTorch's `Conv2d` (and so normflows' and
/// nflows' conditioners): weight and bias `U(±1/√(C_in·k²))`. candle's own `conv2d`
/// draws the weight from a Kaiming normal about 2.4 times wider and the bias over
/// `±1/√C_in`; with those starts a digits Glow fit its training images as well but
/// scored 0.24 bits/dim worse on held-out ones (2.59 against 2.36).
fn torch_conv2d(
    in_channels: usize,
    out_channels: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let bound = 1.0 / ((in_channels * k * k) as f64).sqrt();
    let init = candle_nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.get_with_hints((out_channels, in_channels, k, k), "weight", init)?;
    let bias = vb.get_with_hints(out_channels, "bias", init)?;
    Ok(Conv2d::new(weight, Some(bias), cfg))
}

/// `(1, 1, H, W)` with 1 where `(h + w) % 2 == parity`.
fn checkerboard(shape: ImageShape, parity: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f64> = (0..shape.pixels())
        .map(|k| {
            let (h, w) = (k / shape.width, k % shape.width);
            if (h + w) % 2 == parity {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (1, 1, shape.height, shape.width), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

impl ConvCoupling {
    /// Reads (or creates) the conditioner's tensors under `vb`.
    pub fn new(cfg: &ConvCouplingConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle::Error::Msg)?;
        let (kept, transformed) = cfg.mask.channels(cfg.shape.channels);
        let hidden = cfg.hidden_channels;
        let padded = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = torch_conv2d(kept, hidden, 3, padded, vb.pp("conv_in"))?;
        let conv_hidden = torch_conv2d(
            hidden,
            hidden,
            1,
            Conv2dConfig::default(),
            vb.pp("conv_hidden"),
        )?;
        let conv_out = if cfg.zero_init {
            let vb = vb.pp("conv_out");
            let weight = vb.get_with_hints(
                (2 * transformed, hidden, 3, 3),
                "weight",
                candle_nn::init::ZERO,
            )?;
            let bias = vb.get_with_hints(2 * transformed, "bias", candle_nn::init::ZERO)?;
            Conv2d::new(weight, Some(bias), padded)
        } else {
            torch_conv2d(hidden, 2 * transformed, 3, padded, vb.pp("conv_out"))?
        };
        let pixel_mask = match cfg.mask {
            CouplingMask::Checkerboard => Some(0),
            CouplingMask::CheckerboardInv => Some(1),
            _ => None,
        }
        .map(|parity| checkerboard(cfg.shape, parity, vb.dtype(), vb.device()))
        .transpose()?;
        Ok(Self {
            shape: cfg.shape,
            mask: cfg.mask,
            activation: cfg.activation,
            scale: cfg.scale,
            exact_sigmoid: cfg.exact_sigmoid,
            conv_in,
            conv_hidden,
            conv_out,
            pixel_mask,
        })
    }

    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    pub fn mask(&self) -> CouplingMask {
        self.mask
    }

    /// The three convolutions, input first.
    pub fn convs(&self) -> [&Conv2d; 3] {
        [&self.conv_in, &self.conv_hidden, &self.conv_out]
    }

    /// The conditioner's raw output `(batch, 2·C_b, H, W)`: each transformed channel's
    /// shift, then its raw scale.
    fn conditioner(&self, kept: &Tensor) -> Result<Tensor> {
        let h = conv(&self.conv_in, kept, Some(self.activation))?;
        let h = conv(&self.conv_hidden, &h, Some(self.activation))?;
        conv(&self.conv_out, &h, None)
    }

    /// `(t, ls)` from the conditioner's input, each `(batch, C_b, H, W)`.
    fn shift_and_log_scale(&self, kept: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.conditioner(kept)?;
        let (b, two_cb, height, width) = h.dims4()?;
        let h = h.reshape((b, two_cb / 2, 2, height, width))?;
        let t = h.narrow(2, 0, 1)?.squeeze(2)?;
        let s = h.narrow(2, 1, 1)?.squeeze(2)?;
        let ls = if self.exact_sigmoid {
            // log σ(y) = −softplus(−y) = min(y, 0) − log(1 + e^{−|y|}), y = s + 2: no
            // overflow for large |s|.
            let y = s.affine(1.0, 2.0)?;
            (y.minimum(0.0)? - y.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?
        } else {
            self.scale.log_scale(&s)?
        };
        Ok((t, ls))
    }

    /// Splits an image by channels into `(kept, transformed)`.
    fn split_channels(&self, img: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = self.shape.channels;
        let (kept, transformed) = self.mask.channels(c);
        Ok(match self.mask {
            CouplingMask::Channel => (img.narrow(1, 0, kept)?, img.narrow(1, kept, transformed)?),
            _ => (
                img.narrow(1, transformed, kept)?,
                img.narrow(1, 0, transformed)?,
            ),
        })
    }

    /// Joins `(kept, transformed)` channels back in the image's order.
    fn join_channels(&self, kept: &Tensor, transformed: &Tensor) -> Result<Tensor> {
        match self.mask {
            CouplingMask::Channel => Tensor::cat(&[kept, transformed], 1),
            _ => Tensor::cat(&[transformed, kept], 1),
        }
    }

    /// Whether [`Self::run`] takes [`Self::run_fused`]: a channel mask, the scale maps
    /// the kernel has (not the exact sigmoid), and the fused affine kernel on CUDA. On
    /// the CPU the plain ops are faster for images (Glow on Fashion-MNIST trained about
    /// a tenth slower through the kernel), so they stay.
    fn takes_fused(&self, x: &Tensor) -> bool {
        self.pixel_mask.is_none()
            && !self.exact_sigmoid
            && x.device().is_cuda()
            && flow_kernels::fused(flow_kernels::Op::AffineCoupling, x)
    }

    /// A channel-masked coupling's element-wise work as the fused affine kernel, the
    /// shift before the scale: the conditioner's shifts and raw scales laid out as the
    /// kernel's `t` and `s`, the transformed channels one run of each row. The same
    /// values and gradients as the plain ops of [`Self::run`], up to rounding.
    fn run_fused(&self, x: &Tensor, inverse: bool) -> Result<(Tensor, Tensor)> {
        let img = self.shape.to_image(x, "conv-coupling")?;
        let (kept, _) = self.split_channels(&img)?;
        let h = self.conditioner(&kept.contiguous()?)?;
        let (b, two_cb, height, width) = h.dims4()?;
        let (cb, pixels) = (two_cb / 2, height * width);
        let h = h.reshape((b, cb, 2, pixels))?;
        let t = h.narrow(2, 0, 1)?.reshape((b, cb * pixels))?;
        let s = h.narrow(2, 1, 1)?.reshape((b, cb * pixels))?;
        // The transformed channels: the last ones with the channel mask, the first with
        // its flip.
        let first = match self.mask {
            CouplingMask::Channel => self.shape.channels - cb,
            _ => 0,
        };
        let transformed: Vec<usize> = (first * pixels..(first + cb) * pixels).collect();
        flow_kernels::affine::coupling_in_order(
            &img.reshape((b, ()))?,
            &transformed,
            &s,
            &t,
            self.scale,
            inverse,
            flow_kernels::affine::Order::ShiftThenScale,
        )
    }

    fn run(&self, x: &Tensor, inverse: bool) -> Result<(Tensor, Tensor)> {
        if self.takes_fused(x) {
            return self.run_fused(x, inverse);
        }
        let img = self.shape.to_image(x, "conv-coupling")?;
        let b = img.dim(0)?;
        let step = |xb: &Tensor, t: &Tensor, ls: &Tensor| -> Result<Tensor> {
            if inverse {
                xb.mul(&ls.neg()?.exp()?)?.sub(t)
            } else {
                xb.add(t)?.mul(&ls.exp()?)
            }
        };
        let (out, ls) = match &self.pixel_mask {
            None => {
                let (kept, xb) = self.split_channels(&img)?;
                let (t, ls) = self.shift_and_log_scale(&kept.contiguous()?)?;
                let zb = step(&xb, &t, &ls)?;
                (self.join_channels(&kept, &zb)?, ls)
            }
            Some(m) => {
                // z = m⊙x + (1 − m)⊙step(x): the kept pixels pass unchanged, and the
                // conditioner sees only them (the transformed ones zeroed), so it reads
                // the same values going either way.
                let kept = img.broadcast_mul(m)?;
                let (t, ls) = self.shift_and_log_scale(&kept)?;
                let free = m.affine(-1.0, 1.0)?;
                let ls = ls.broadcast_mul(&free)?;
                let moved = step(&img, &t, &ls)?.broadcast_mul(&free)?;
                (kept.add(&moved)?, ls)
            }
        };
        let log_det = ls.reshape((b, ()))?.sum(1)?;
        let log_det = if inverse { log_det.neg()? } else { log_det };
        Ok((ImageShape::to_rows(&out)?, log_det))
    }
}

impl Bijector for ConvCoupling {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.run(x, false)
    }

    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.run(z, true)
    }

    /// With a channel mask, one pass of the conditioner: the kept channels are the same
    /// in the input and the output, so the shift and scale computed from them (with
    /// the gradient on) serve both to recompute the transformed channels and to run the
    /// forward pass from the recomputed input.
    fn recompute(
        &self,
        z: &Tensor,
        context: Option<&Tensor>,
        record: &[Tensor],
    ) -> Result<(Var, Tensor, Tensor)> {
        if self.pixel_mask.is_some() {
            return recompute_by_inverse(self, z, context, record);
        }
        // The leaf starts as the output: its kept channels are already the input's.
        let leaf = Var::from_tensor(&z.detach())?;
        let img = self.shape.to_image(leaf.as_tensor(), "conv-coupling")?;
        let b = img.dim(0)?;
        let (kept, xb) = self.split_channels(&img)?;
        let (t, ls) = self.shift_and_log_scale(&kept.contiguous()?)?;
        // The transformed channels, inverted with the shift and scale's values, written
        // into the leaf in place: what was computed from the leaf so far read only the
        // kept channels, which this leaves as they are, and `xb` views the leaf, so the
        // forward pass below reads the recomputed values.
        let (kept_z, zb) =
            self.split_channels(&self.shape.to_image(&z.detach(), "conv-coupling")?)?;
        let recomputed = zb.mul(&ls.detach().neg()?.exp()?)?.sub(&t.detach())?;
        let input = self.join_channels(&kept_z, &recomputed)?;
        leaf.set(&ImageShape::to_rows(&input)?.contiguous()?)?;
        let out = self.join_channels(&kept, &xb.add(&t)?.mul(&ls.exp()?)?)?;
        let log_det = ls.reshape((b, ()))?.sum(1)?;
        Ok((leaf, ImageShape::to_rows(&out)?, log_det))
    }
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Tensor, Var};
    use candle_nn::VarMap;
    use flow_core::seeded_var_builder;
    use flow_nn::ScaleMap;

    use super::{ConvCoupling, ConvCouplingConfig, CouplingMask};
    use crate::ImageShape;

    /// The fused route (which CUDA takes) against the plain ops on the CPU: outputs,
    /// log-dets and the gradients of every weight and of the input, for both channel
    /// masks on an odd channel count, three scale maps and both directions.
    #[test]
    fn the_fused_route_matches_the_plain_ops() -> candle::Result<()> {
        let dev = Device::Cpu;
        let shape = ImageShape::new(3, 4, 5);
        let scales = [
            ScaleMap::Sigmoid,
            ScaleMap::Exp,
            ScaleMap::Tanh { clamp: 1.5 },
        ];
        for mask in [CouplingMask::Channel, CouplingMask::ChannelInv] {
            for scale in scales {
                let cfg = ConvCouplingConfig::new(shape, mask)
                    .with_hidden_channels(6)
                    .with_scale(scale);
                let varmap = VarMap::new();
                let layer =
                    ConvCoupling::new(&cfg, seeded_var_builder(&varmap, 2, DType::F64, &dev))?;
                // Lively weights: the last convolution starts at zero.
                for var in varmap.all_vars() {
                    let t = Tensor::randn(0.0, 0.3, var.shape(), &dev)?.to_dtype(DType::F64)?;
                    var.set(&t)?;
                }
                for inverse in [false, true] {
                    let x = Var::from_tensor(
                        &Tensor::randn(0.0, 1.0, (3, shape.dim()), &dev)?.to_dtype(DType::F64)?,
                    )?;
                    let w =
                        Tensor::randn(0.0, 1.0, (3, shape.dim()), &dev)?.to_dtype(DType::F64)?;
                    let outputs = |fused: bool| -> candle::Result<Vec<Tensor>> {
                        let (y, ld) = if fused {
                            layer.run_fused(x.as_tensor(), inverse)?
                        } else {
                            layer.run(x.as_tensor(), inverse)?
                        };
                        let grads = ((&y * &w)?.sum_all()? + ld.sum_all()?)?.backward()?;
                        let mut out = vec![y, ld, grads.get(x.as_tensor()).expect("∂x").clone()];
                        for var in varmap.all_vars() {
                            out.push(grads.get(var.as_tensor()).expect("a gradient").clone());
                        }
                        Ok(out)
                    };
                    let (fused, plain) = (outputs(true)?, outputs(false)?);
                    for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
                        let gap = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                        assert!(
                            gap < 1e-10,
                            "{mask:?} {scale:?} inverse {inverse}: output {i} off by {gap:e}"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
