//! The causal Transformer that conditions a block: from the tokens before each
//! position, the shift and log-scale of that position's token.

use candle::{DType, Module, Result, Tensor, D};
use candle_nn::{init::Init, kv_cache::KvCache, LayerNorm, LayerNormConfig, Linear, VarBuilder};
use flow_nn::{Mlp, NetConfig};

use crate::attention::{attend_cached, tracked, CausalMask};
use crate::TarFlowBlockConfig;

/// Layer norms' `ε`, PyTorch's default.
const LAYER_NORM_EPS: f64 = 1e-5;
/// Standard deviation of the positional embeddings' initial values.
const POSITION_INIT_STD: f64 = 0.02;

/// A layer norm over the last dimension: candle-nn's fused op for `f32` where no
/// gradient is needed, the same arithmetic from differentiable ops otherwise.
fn layer_norm(x: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
    let fused = x.dtype() == DType::F32 && !tracked(x) && !tracked(ln.weight());
    if fused {
        return ln.forward(&x.contiguous()?);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + ln.eps())?.sqrt()?)?;
    let scaled = normed.broadcast_mul(ln.weight())?;
    match ln.bias() {
        Some(b) => scaled.broadcast_add(b),
        None => Ok(scaled),
    }
}

fn norm(width: usize, vb: VarBuilder) -> Result<LayerNorm> {
    let cfg = LayerNormConfig {
        eps: LAYER_NORM_EPS,
        ..LayerNormConfig::default()
    };
    candle_nn::layer_norm(width, cfg, vb)
}

/// A `Linear(in, out)` whose weight and bias start at zero.
fn zero_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))?;
    let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(weight, Some(bias)))
}

/// One pre-norm layer: `h + attention(norm(h))`, then `h + mlp(norm(h))`.
/// Tensors: `norm1`, `qkv` (queries, keys and values of every head in one product),
/// `proj`, `norm2`, `mlp`.
#[derive(Debug, Clone)]
struct Layer {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    mlp: Mlp,
    heads: usize,
}

impl Layer {
    fn new(cfg: &TarFlowBlockConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let mlp = NetConfig::Mlp {
            hidden: vec![cfg.mlp_hidden()],
            activation: cfg.activation,
        };
        Ok(Self {
            norm1: norm(w, vb.pp("norm1"))?,
            qkv: candle_nn::linear(w, 3 * w, vb.pp("qkv"))?,
            proj: candle_nn::linear(w, w, vb.pp("proj"))?,
            norm2: norm(w, vb.pp("norm2"))?,
            mlp: Mlp::new(&mlp, w, w, false, vb.pp("mlp"))?,
            heads: cfg.heads,
        })
    }

    /// Queries, keys and values `(3, batch, heads, tokens, head width)` of `h`
    /// `(batch·tokens, width)`.
    fn qkv(&self, h: &Tensor, batch: usize, tokens: usize) -> Result<Tensor> {
        let width = h.dim(1)?;
        let qkv = self.qkv.forward(&layer_norm(h, &self.norm1)?)?;
        qkv.reshape((batch, tokens, 3, self.heads, width / self.heads))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()
    }

    /// The rest of the layer once attention has given `a` `(batch, heads, tokens,
    /// head width)`.
    fn finish(&self, h: &Tensor, a: &Tensor) -> Result<Tensor> {
        let (batch, _, tokens, _) = a.dims4()?;
        let a = a
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch * tokens, ()))?;
        let h = (h + self.proj.forward(&a)?)?;
        let m = self.mlp.forward(&layer_norm(&h, &self.norm2)?)?;
        h + m
    }

    /// The whole sequence: `h` `(batch·tokens, width)`.
    fn forward(&self, h: &Tensor, batch: usize, mask: &CausalMask) -> Result<Tensor> {
        let tokens = h.dim(0)? / batch;
        let qkv = self.qkv(h, batch, tokens)?;
        let a = mask.attend(&qkv.get(0)?, &qkv.get(1)?, &qkv.get(2)?)?;
        self.finish(h, &a)
    }

    /// The next position: `h` `(batch, width)`, its key and value appended to `cache`.
    fn step(&self, h: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let batch = h.dim(0)?;
        let qkv = self.qkv(h, batch, 1)?;
        let (k, v) = cache.append(&qkv.get(1)?, &qkv.get(2)?)?;
        let a = attend_cached(&qkv.get(0)?, &k, &v)?;
        self.finish(h, &a)
    }
}

/// The conditioner of a block: the sequence shifted right by one token (position 0
/// sees zeros, and so its parameters come from the learned positional embedding
/// alone), embedded by `input`, with `position` and, for a conditional flow, the
/// embedded context added to every token; then the layers, a final `norm` and the
/// `output` projection to `2·p²·C` values per token (raw log-scales, then shifts),
/// zero-initialised unless the block says otherwise so that the block starts as the
/// identity.
#[derive(Debug, Clone)]
pub(crate) struct Transformer {
    input: Linear,
    position: Tensor,
    context: Option<Linear>,
    layers: Vec<Layer>,
    norm: LayerNorm,
    output: Linear,
    mask: CausalMask,
    tokens: usize,
    token_dim: usize,
}

impl Transformer {
    pub(crate) fn new(cfg: &TarFlowBlockConfig, vb: VarBuilder) -> Result<Self> {
        let (tokens, token_dim, w) = (cfg.patches().tokens(), cfg.patches().token_dim(), cfg.width);
        let position = vb.get_with_hints(
            (tokens, w),
            "position",
            Init::Randn {
                mean: 0.0,
                stdev: POSITION_INIT_STD,
            },
        )?;
        let context = match cfg.context_dim {
            0 => None,
            c => Some(candle_nn::linear(c, w, vb.pp("context"))?),
        };
        let layers = (0..cfg.layers)
            .map(|i| Layer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<_>>()?;
        let output = if cfg.zero_init {
            zero_linear(w, 2 * token_dim, vb.pp("output"))?
        } else {
            candle_nn::linear(w, 2 * token_dim, vb.pp("output"))?
        };
        Ok(Self {
            input: candle_nn::linear(token_dim, w, vb.pp("input"))?,
            position,
            context,
            layers,
            norm: norm(w, vb.pp("norm"))?,
            output,
            mask: CausalMask::new(tokens, vb.dtype(), vb.device())?,
            tokens,
            token_dim,
        })
    }

    /// The context's embedding `(batch, 1, width)`; an error when the block is
    /// conditional and none is given, or the other way round.
    fn context(&self, context: Option<&Tensor>) -> Result<Option<Tensor>> {
        match (&self.context, context) {
            (Some(l), Some(c)) => Ok(Some(l.forward(c)?.unsqueeze(1)?)),
            (None, None) => Ok(None),
            (Some(_), None) => candle::bail!("a conditional TarFlow block needs a context"),
            (None, Some(_)) => candle::bail!("this TarFlow block takes no context"),
        }
    }

    /// Raw parameters `(batch·tokens, 2·token_dim)` of every token of `seq`
    /// `(batch, tokens·token_dim)`, each from the tokens before it.
    pub(crate) fn forward(&self, seq: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let batch = seq.dim(0)?;
        let (t, d) = (self.tokens, self.token_dim);
        let before = if t == 1 {
            seq.zeros_like()?
        } else {
            seq.narrow(1, 0, (t - 1) * d)?.pad_with_zeros(1, d, 0)?
        };
        let h = self.input.forward(&before.reshape((batch * t, d))?)?;
        let mut h = h.reshape((batch, t, ()))?.broadcast_add(&self.position)?;
        if let Some(c) = self.context(context)? {
            h = h.broadcast_add(&c)?;
        }
        let mut h = h.reshape((batch * t, ()))?;
        for layer in &self.layers {
            h = layer.forward(&h, batch, &self.mask)?;
        }
        self.output.forward(&layer_norm(&h, &self.norm)?)
    }

    /// A fresh key-value cache for each layer.
    pub(crate) fn caches(&self) -> Vec<KvCache> {
        self.layers
            .iter()
            .map(|_| KvCache::new(2, self.tokens))
            .collect()
    }

    /// Raw parameters `(batch, 2·token_dim)` of token `t`, given the token before it
    /// (`None` for the first), the keys and values of the earlier positions in
    /// `caches` (which this extends by position `t`).
    pub(crate) fn step(
        &self,
        t: usize,
        before: Option<&Tensor>,
        batch: usize,
        context: Option<&Tensor>,
        caches: &mut [KvCache],
    ) -> Result<Tensor> {
        let before = match before {
            Some(x) => x.clone(),
            None => Tensor::zeros(
                (batch, self.token_dim),
                self.position.dtype(),
                self.position.device(),
            )?,
        };
        let mut h = self
            .input
            .forward(&before)?
            .broadcast_add(&self.position.get(t)?)?;
        if let Some(c) = self.context(context)? {
            h = h.broadcast_add(&c.squeeze(1)?)?;
        }
        for (layer, cache) in self.layers.iter().zip(caches) {
            h = layer.step(&h, cache)?;
        }
        self.output.forward(&layer_norm(&h, &self.norm)?)
    }
}
