use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use candle::{bail, DType, Result, Tensor};
use candle_nn::{init::Init, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{
    fused::{pack_linear, FusedMlp},
    Activation,
};

/// Architecture of a conditioner network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum NetConfig {
    /// `Linear → act → … → Linear` with the given hidden widths. Linear `i` is stored
    /// under `{2i}` (the indices of a PyTorch `Sequential` that interleaves activations).
    Mlp {
        hidden: Vec<usize>,
        activation: Activation,
    },
    /// `Linear(in, h)`, then `blocks` residual blocks `u + L₁(act(L₀(act(u))))`, then
    /// `Linear(h, out)`. Stored under `input`, `blocks.{b}.{0,1}` and `output`.
    Residual {
        hidden: usize,
        blocks: usize,
        activation: Activation,
    },
}

impl NetConfig {
    pub fn activation(&self) -> Activation {
        match self {
            Self::Mlp { activation, .. } | Self::Residual { activation, .. } => *activation,
        }
    }
}

/// A conditioner network: `(batch, in) → (batch, out)`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Plain: every layer in order. Residual: input, the two layers of each block, output.
    layers: Vec<Linear>,
    residual: bool,
    activation: Activation,
}

/// A `Linear(in, out)` initialised like PyTorch's (`U(±1/√in)` for weight and bias), or
/// with zeros when `zero` is set.
fn linear(in_dim: usize, out_dim: usize, zero: bool, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let init = if zero {
        Init::Const(0.0)
    } else {
        Init::Uniform {
            lo: -bound,
            up: bound,
        }
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = vb.get_with_hints(out_dim, "bias", init)?;
    Ok(Linear::new(weight, Some(bias)))
}

impl Mlp {
    /// Builds the network; with `zero_last` the output layer starts at zero, so a
    /// coupling layer using it starts as the identity.
    pub fn new(
        cfg: &NetConfig,
        in_dim: usize,
        out_dim: usize,
        zero_last: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        match cfg {
            NetConfig::Mlp { hidden, activation } => {
                let widths: Vec<usize> = std::iter::once(in_dim)
                    .chain(hidden.iter().copied())
                    .chain(std::iter::once(out_dim))
                    .collect();
                let n = widths.len() - 1;
                let layers = (0..n)
                    .map(|i| {
                        let last = i + 1 == n;
                        linear(widths[i], widths[i + 1], zero_last && last, vb.pp(2 * i))
                    })
                    .collect::<Result<_>>()?;
                Ok(Self {
                    layers,
                    residual: false,
                    activation: *activation,
                })
            }
            NetConfig::Residual {
                hidden,
                blocks,
                activation,
            } => {
                let h = *hidden;
                let mut layers = vec![linear(in_dim, h, false, vb.pp("input"))?];
                for b in 0..*blocks {
                    let vb = vb.pp("blocks").pp(b);
                    layers.push(linear(h, h, false, vb.pp(0))?);
                    layers.push(linear(h, h, false, vb.pp(1))?);
                }
                layers.push(linear(h, out_dim, zero_last, vb.pp("output"))?);
                Ok(Self {
                    layers,
                    residual: true,
                    activation: *activation,
                })
            }
        }
    }

    pub fn layers(&self) -> &[Linear] {
        &self.layers
    }
}

impl Mlp {
    /// Whether [`forward`](Module::forward) takes a fused kernel: one hidden layer, a
    /// supported activation, f32/f64, fusion enabled, on the CPU or (with the `cuda`
    /// feature, [`set_cuda_fusion`] on and at most 16 inputs and outputs) on CUDA.
    pub fn uses_fused(&self, x: &Tensor) -> bool {
        !self.residual
            && self.layers.len() == 2
            && FusedMlp::supports(self.activation)
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && fusion_enabled()
            && (x.device().is_cpu() || self.cuda_fusable(x))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fusable(&self, x: &Tensor) -> bool {
        use crate::fused::CUDA_MAX_IO;
        let small = |n: Result<usize>| n.is_ok_and(|n| n <= CUDA_MAX_IO);
        x.device().is_cuda()
            && cuda_fusion_enabled()
            && small(x.dim(1))
            && self.layers.get(1).is_some_and(|l| small(l.weight().dim(0)))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda_fusable(&self, _: &Tensor) -> bool {
        false
    }

    fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        let pack = |l: &Linear| -> Result<Tensor> {
            let Some(b) = l.bias() else {
                bail!("fused networks need biases");
            };
            pack_linear(l.weight(), b)
        };
        let p1 = pack(&self.layers[0])?;
        let p2 = pack(&self.layers[1])?;
        x.contiguous()?.apply_op3(
            &p1,
            &p2,
            FusedMlp {
                activation: self.activation,
            },
        )
    }

    /// The network built from plain candle ops: the reference the fused kernel is
    /// tested against.
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        let act = self.activation;
        let Some((last, rest)) = self.layers.split_last() else {
            bail!("empty network");
        };
        if !self.residual {
            let mut h = x.clone();
            for layer in rest {
                h = act.apply(&layer.forward(&h)?)?;
            }
            return last.forward(&h);
        }
        let Some((first, blocks)) = rest.split_first() else {
            bail!("residual network without an input layer");
        };
        let mut h = first.forward(x)?;
        for pair in blocks.chunks_exact(2) {
            let u = pair[0].forward(&act.apply(&h)?)?;
            let u = pair[1].forward(&act.apply(&u)?)?;
            h = (h + u)?;
        }
        last.forward(&h)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.uses_fused(x) {
            self.forward_fused(x)
        } else {
            self.forward_reference(x)
        }
    }
}

static FUSION: AtomicBool = AtomicBool::new(true);

/// Turns the fused CPU kernels on (the default) or off, process-wide; off runs every
/// conditioner network and every affine coupling's element-wise part through plain
/// candle ops. For comparisons and benchmarks.
pub fn set_fusion(enabled: bool) {
    FUSION.store(enabled, Ordering::Relaxed);
}

/// Whether the fused CPU kernels are in use.
pub fn fusion_enabled() -> bool {
    FUSION.load(Ordering::Relaxed)
}

/// The CUDA switch; unset until first read, then from `FLOWS_CUDA_FUSION`.
static CUDA_FUSION: OnceLock<AtomicBool> = OnceLock::new();

fn cuda_fusion() -> &'static AtomicBool {
    CUDA_FUSION.get_or_init(|| {
        let off = std::env::var("FLOWS_CUDA_FUSION").is_ok_and(|v| v == "0" || v == "false");
        AtomicBool::new(!off)
    })
}

/// Turns the fused CUDA kernels on or off, process-wide. Off, networks on a CUDA device
/// run through candle's own CUDA ops. The default is on, or off where the environment
/// sets `FLOWS_CUDA_FUSION=0`. Without the `cuda` feature this changes nothing.
pub fn set_cuda_fusion(enabled: bool) {
    cuda_fusion().store(enabled, Ordering::Relaxed);
}

/// Whether the fused CUDA kernels are in use.
pub fn cuda_fusion_enabled() -> bool {
    cuda_fusion().load(Ordering::Relaxed)
}
