//! The causal Transformer that conditions a block: from the tokens before each
//! position, the shift and log-scale of that position's token.

use candle::{Module, Result, Tensor};
use candle_nn::{init::Init, kv_cache::KvCache, LayerNorm, LayerNormConfig, VarBuilder};
use flow_nn::{
    transformer::{fused_layer, layer_norm, CausalSelfAttention, LayerParts},
    Activation, Mlp, NetConfig,
};

use crate::TarFlowBlockConfig;

/// Layer norms' `ε`, PyTorch's default.
const LAYER_NORM_EPS: f64 = 1e-5;
/// Standard deviation of the positional embeddings' initial values.
const POSITION_INIT_STD: f64 = 0.02;

fn norm(width: usize, vb: VarBuilder) -> Result<LayerNorm> {
    let cfg = LayerNormConfig {
        eps: LAYER_NORM_EPS,
        ..LayerNormConfig::default()
    };
    candle_nn::layer_norm(width, cfg, vb)
}

/// A linear map `(rows, in) → (rows, out)` as flow-nn's network without hidden layers
/// (one fused op per pass, bias included), stored under `{vb}.0`; with `zero`, its
/// weight and bias start at zero.
fn linear(in_dim: usize, out_dim: usize, zero: bool, vb: VarBuilder) -> Result<Mlp> {
    let cfg = NetConfig::Mlp {
        hidden: Vec::new(),
        activation: Activation::Relu,
    };
    Mlp::new(&cfg, in_dim, out_dim, zero, vb)
}

/// One pre-norm layer: `h + attention(norm(h))`, then `h + mlp(norm(h))`.
/// Tensors: `norm1`, `qkv` (queries, keys and values of every head in one product),
/// `proj`, `norm2`, `mlp`.
#[derive(Debug, Clone)]
struct Layer {
    norm1: LayerNorm,
    qkv: Mlp,
    attention: CausalSelfAttention,
    proj: Mlp,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Layer {
    fn new(cfg: &TarFlowBlockConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let mlp = NetConfig::Mlp {
            hidden: vec![cfg.mlp_hidden()],
            activation: cfg.activation,
        };
        let tokens = cfg.patches().tokens();
        Ok(Self {
            norm1: norm(w, vb.pp("norm1"))?,
            qkv: linear(w, 3 * w, false, vb.pp("qkv"))?,
            attention: CausalSelfAttention::new(cfg.heads, tokens, vb.dtype(), vb.device())?,
            proj: linear(w, w, false, vb.pp("proj"))?,
            norm2: norm(w, vb.pp("norm2"))?,
            mlp: Mlp::new(&mlp, w, w, false, vb.pp("mlp"))?,
        })
    }

    /// The rest of the layer once attention has given `a` `(rows, width)`.
    fn finish(&self, h: &Tensor, a: &Tensor) -> Result<Tensor> {
        let h = (h + self.proj.forward(a)?)?;
        let m = self.mlp.forward(&layer_norm(&h, &self.norm2)?)?;
        h + m
    }

    /// The whole sequence: `h` `(batch·tokens, width)`; one fused op where it applies.
    fn forward(&self, h: &Tensor, batch: usize) -> Result<Tensor> {
        let parts = LayerParts {
            norm1: &self.norm1,
            qkv: &self.qkv,
            attention: &self.attention,
            proj: &self.proj,
            norm2: &self.norm2,
            mlp: &self.mlp,
        };
        match fused_layer(h, batch, parts)? {
            Some(out) => Ok(out),
            None => self.forward_by_parts(h, batch),
        }
    }

    /// [`forward`](Self::forward) as one op per part: the reference the fused layer
    /// is tested against.
    fn forward_by_parts(&self, h: &Tensor, batch: usize) -> Result<Tensor> {
        let qkv = self.qkv.forward(&layer_norm(h, &self.norm1)?)?;
        let a = self.attention.forward(&qkv, batch)?;
        self.finish(h, &a)
    }

    /// The next position: `h` `(batch, width)`, its key and value appended to `cache`.
    fn step(&self, h: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let qkv = self.qkv.forward(&layer_norm(h, &self.norm1)?)?;
        let a = self.attention.step(&qkv, cache)?;
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
    input: Mlp,
    position: Tensor,
    context: Option<Mlp>,
    layers: Vec<Layer>,
    norm: LayerNorm,
    output: Mlp,
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
            c => Some(linear(c, w, false, vb.pp("context"))?),
        };
        let layers = (0..cfg.layers)
            .map(|i| Layer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            input: linear(token_dim, w, false, vb.pp("input"))?,
            position,
            context,
            layers,
            norm: norm(w, vb.pp("norm"))?,
            output: linear(w, 2 * token_dim, cfg.zero_init, vb.pp("output"))?,
            tokens,
            token_dim,
        })
    }

    /// The context's embedding `(batch, width)`; an error when the block is
    /// conditional and none is given, or the other way round.
    fn context(&self, context: Option<&Tensor>) -> Result<Option<Tensor>> {
        match (&self.context, context) {
            (Some(l), Some(c)) => Ok(Some(l.forward(c)?)),
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
        // The positions reach every sequence as the product `1 · position`, so that
        // their gradient is one matrix product over the batch: the gradient of a
        // broadcast is a sum over the batch that candle takes element by element.
        // Each node is a gradient that candle's autograd zero-fills and adds to, so
        // the rows keep their shape `(batch·tokens, width)` throughout.
        let ones = Tensor::ones((batch, 1), h.dtype(), h.device())?;
        let positions = ones.matmul(&self.position.reshape((1, ()))?)?;
        let mut h = (h + positions.reshape((batch * t, ()))?)?;
        if let Some(c) = self.context(context)? {
            let c = c.unsqueeze(1)?.broadcast_as((batch, t, c.dim(1)?))?;
            h = (h + c.reshape((batch * t, ()))?)?;
        }
        for layer in &self.layers {
            h = layer.forward(&h, batch)?;
        }
        self.output.forward(&layer_norm(&h, &self.norm)?)
    }

    /// A fresh key-value cache for each layer.
    pub(crate) fn caches(&self) -> Vec<KvCache> {
        self.layers.iter().map(|l| l.attention.cache()).collect()
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
            h = (h + c)?;
        }
        for (layer, cache) in self.layers.iter().zip(caches) {
            h = layer.step(&h, cache)?;
        }
        self.output.forward(&layer_norm(&h, &self.norm)?)
    }
}
