//! One TarFlow block: an affine autoregressive map over an image's patches, its
//! parameters from a causal Transformer.

use candle::{Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::ImageShape;
use flow_core::{limits, Bijector, LayerConfig};
use flow_nn::{apply_transform, Activation, Affine, Features, ScaleMap, Transform};
use serde::{Deserialize, Serialize};

use crate::{patches, transformer::Transformer, Patches};

/// A [`TarFlowBlock`]: the image and its patches, the Transformer's size, the
/// log-scale's bound, and whether the block reads the tokens last to first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TarFlowBlockConfig {
    pub shape: ImageShape,
    /// Side of the square patches: tokens of `patch²·C` values.
    pub patch: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Width of the token embeddings.
    pub width: usize,
    /// Attention heads; they divide `width`.
    pub heads: usize,
    /// Hidden units of each layer's MLP, as a multiple of `width`.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: usize,
    /// The MLP's non-linearity.
    #[serde(default = "default_activation")]
    pub activation: Activation,
    /// How the raw log-scale is bounded.
    #[serde(default)]
    pub scale: ScaleMap,
    /// Tokens read last to first.
    #[serde(default)]
    pub reversed: bool,
    /// Context features embedded into every token (0: unconditional).
    #[serde(default)]
    pub context_dim: usize,
    /// The output projection starts at zero, so the block starts as the identity.
    #[serde(default = "default_true")]
    pub zero_init: bool,
}

/// The MLP's hidden width over the embedding width, the usual Transformer's.
pub const DEFAULT_MLP_RATIO: usize = 4;

fn default_mlp_ratio() -> usize {
    DEFAULT_MLP_RATIO
}

fn default_activation() -> Activation {
    Activation::Relu
}

fn default_true() -> bool {
    true
}

impl TarFlowBlockConfig {
    pub fn new(shape: ImageShape, patch: usize, layers: usize, width: usize, heads: usize) -> Self {
        Self {
            shape,
            patch,
            layers,
            width,
            heads,
            mlp_ratio: DEFAULT_MLP_RATIO,
            activation: default_activation(),
            scale: ScaleMap::default(),
            reversed: false,
            context_dim: 0,
            zero_init: true,
        }
    }

    flow_core::with_setters! {
        with_mlp_ratio: mlp_ratio: usize,
        with_activation: activation: Activation,
        with_scale: scale: ScaleMap,
        with_reversed: reversed: bool,
        with_context_dim: context_dim: usize,
        with_zero_init: zero_init: bool,
    }

    pub fn patches(&self) -> Patches {
        Patches::new(self.shape, self.patch)
    }

    /// Hidden units of each layer's MLP.
    pub fn mlp_hidden(&self) -> usize {
        self.mlp_ratio.saturating_mul(self.width)
    }

    /// Checks every size before anything is made: the patches fit the image, the
    /// heads divide the width, and every width and tensor is within
    /// [`flow_core::limits`].
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.patches().validate()?;
        for (name, v) in [
            ("layers", self.layers),
            ("width", self.width),
            ("heads", self.heads),
            ("mlp_ratio", self.mlp_ratio),
        ] {
            if v == 0 {
                return Err(format!("a TarFlow block needs `{name}` of at least 1"));
            }
        }
        limits::check_at_most("Transformer layers", self.layers, limits::MAX_LAYERS)?;
        limits::check_at_most("embedding width", self.width, limits::MAX_HIDDEN)?;
        if !self.width.is_multiple_of(self.heads) {
            return Err(format!(
                "{} heads do not divide an embedding width of {}",
                self.heads, self.width
            ));
        }
        limits::check_at_most("context features", self.context_dim, limits::MAX_DIM)?;
        let (tokens, d, w) = (
            self.patches().tokens(),
            self.patches().token_dim(),
            self.width,
        );
        limits::check_dense(&[d, w])?;
        limits::check_dense(&[w, 3 * w])?;
        limits::check_dense(&[w, self.mlp_hidden(), w])?;
        limits::check_dense(&[w, 2 * d])?;
        limits::check_dense(&[self.context_dim, w])?;
        limits::checked_product(
            "positional embeddings",
            &[tokens, w],
            limits::MAX_TENSOR_ELEMENTS,
        )?;
        Transform::check(&Affine::new(self.scale)).map_err(|e| format!("the log-scale's {e}"))
    }

    pub fn dim(&self) -> usize {
        self.shape.dim()
    }
}

impl LayerConfig for TarFlowBlockConfig {
    fn check(&self, dim: usize, context_dim: usize) -> std::result::Result<(), String> {
        self.validate()?;
        if self.dim() != dim {
            return Err(format!(
                "a TarFlow block over {} images ({} features) in a model of {dim} features",
                self.shape,
                self.dim()
            ));
        }
        if self.context_dim != context_dim {
            return Err(format!(
                "a TarFlow block of {} context features in a model of {context_dim}",
                self.context_dim
            ));
        }
        Ok(())
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
        Ok(Box::new(TarFlowBlock::new(self, vb)?))
    }
}

/// Data to latent, on flat `(C, H, W)` rows: the image read as a sequence of patch
/// tokens `x_0 … x_{T−1}` (last to first when reversed), then, token by token,
///
/// `z_t = x_t ⊙ exp(ŝ_t) + b_t`, `(s_t, b_t) = Transformer(x_0 … x_{t−1})`,
///
/// `ŝ` the [`ScaleMap`] of `s`, and `log|det| = Σ_t Σ ŝ_t`, written back in the
/// image's own order. The density is one pass of the Transformer over the whole
/// sequence; the inverse takes `T` steps, each one position of the Transformer
/// against a key-value cache of the positions before it.
///
/// Tensors: `transformer.input`, `.position`, `.context` (conditional blocks),
/// `.layers.{i}.{norm1, qkv, proj, norm2, mlp}`, `.norm`, `.output`.
#[derive(Debug, Clone)]
pub struct TarFlowBlock {
    transformer: Transformer,
    affine: Affine,
    /// Sequence position → image feature, and back.
    order: Tensor,
    unorder: Tensor,
    /// `0..T·p²·C`, the features the update maps (all of them).
    every: Vec<usize>,
    tokens: usize,
    token_dim: usize,
}

impl TarFlowBlock {
    pub fn new(cfg: &TarFlowBlockConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle::Error::Msg)?;
        let order = cfg.patches().order(cfg.reversed);
        let unorder = patches::inverse(&order);
        let n = order.len();
        Ok(Self {
            transformer: Transformer::new(cfg, vb.pp("transformer"))?,
            affine: Affine::new(cfg.scale),
            order: Tensor::from_vec(order, n, vb.device())?,
            unorder: Tensor::from_vec(unorder, n, vb.device())?,
            every: (0..n).collect(),
            tokens: cfg.patches().tokens(),
            token_dim: cfg.patches().token_dim(),
        })
    }

    /// `(s, b)`, each `(batch, n)`, from raw parameters `(batch, k·2·token_dim)` of
    /// `k` tokens.
    fn split(&self, params: &Tensor, batch: usize) -> Result<(Tensor, Tensor)> {
        let d = self.token_dim;
        let p = params.reshape((batch, (), 2 * d))?;
        let s = p.narrow(2, 0, d)?.reshape((batch, ()))?;
        let b = p.narrow(2, d, d)?.reshape((batch, ()))?;
        Ok((s, b))
    }

    fn check_rows(&self, x: &Tensor) -> Result<usize> {
        let n = self.every.len();
        match x.dims() {
            [b, d] if *d == n => Ok(*b),
            dims => candle::bail!("a TarFlow block takes rows (batch, {n}), got {dims:?}"),
        }
    }

    fn forward_impl(&self, x: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let batch = self.check_rows(x)?;
        let seq = x.index_select(&self.order, 1)?;
        let params = self.transformer.forward(&seq, context)?;
        let (s, b) = self.split(&params, batch)?;
        let features = Features::All {
            indices: &self.every,
        };
        let (z, log_det) = apply_transform(&self.affine, &seq, features, &[s, b], false)?;
        Ok((z.index_select(&self.unorder, 1)?, log_det))
    }

    /// Token `t` of `z_seq` `(batch, T·d)` mapped back, from its raw parameters
    /// `(batch, 2·d)`: `(x_t, log|det|)`.
    fn invert_token(&self, z_seq: &Tensor, t: usize, params: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = self.token_dim;
        let batch = z_seq.dim(0)?;
        let (s, b) = self.split(params, batch)?;
        let features = Features::All {
            indices: &self.every[..d],
        };
        let z_t = z_seq.narrow(1, t * d, d)?;
        apply_transform(&self.affine, &z_t, features, &[s, b], true)
    }

    /// The tokens `x_0 … x_{T−1}` back in the image's order, and the summed log-dets.
    fn assemble(&self, tokens: &[Tensor], log_dets: &[Tensor]) -> Result<(Tensor, Tensor)> {
        let x = Tensor::cat(tokens, 1)?.index_select(&self.unorder, 1)?;
        let log_det = Tensor::stack(log_dets, 0)?.sum(0)?;
        Ok((x, log_det))
    }

    fn inverse_impl(&self, z: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let batch = self.check_rows(z)?;
        let z_seq = z.index_select(&self.order, 1)?;
        let mut caches = self.transformer.caches();
        let (mut tokens, mut log_dets) = (Vec::new(), Vec::new());
        for t in 0..self.tokens {
            let params = self
                .transformer
                .step(t, tokens.last(), batch, context, &mut caches)?;
            let (x_t, log_det) = self.invert_token(&z_seq, t, &params)?;
            tokens.push(x_t);
            log_dets.push(log_det);
        }
        self.assemble(&tokens, &log_dets)
    }

    /// The inverse without a key-value cache: at each step the whole Transformer runs
    /// over the tokens found so far (zeros after them, which no earlier position sees).
    /// `T` full passes instead of `T` single positions: the reference the cached
    /// [`inverse`](Bijector::inverse) is tested against.
    pub fn inverse_uncached(
        &self,
        z: &Tensor,
        context: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let batch = self.check_rows(z)?;
        let d = self.token_dim;
        let z_seq = z.index_select(&self.order, 1)?;
        let (mut tokens, mut log_dets) = (Vec::new(), Vec::new());
        for t in 0..self.tokens {
            let mut seq = tokens.clone();
            seq.push(Tensor::zeros(
                (batch, (self.tokens - t) * d),
                z.dtype(),
                z.device(),
            )?);
            let params = self.transformer.forward(&Tensor::cat(&seq, 1)?, context)?;
            let params = params.reshape((batch, self.tokens, ()))?.get_on_dim(1, t)?;
            let (x_t, log_det) = self.invert_token(&z_seq, t, &params)?;
            tokens.push(x_t);
            log_dets.push(log_det);
        }
        self.assemble(&tokens, &log_dets)
    }
}

impl Bijector for TarFlowBlock {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_impl(x, None)
    }

    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inverse_impl(z, None)
    }

    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_impl(x, Some(context))
    }

    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inverse_impl(z, Some(context))
    }
}
