//! Pieces of causal Transformers, for conditioners over sequences: a layer norm and
//! multi-head causal self-attention, each with two doors, a fused op with its own
//! backward ([`flow_kernels::transformer`]) where [`flow_kernels::fused`] takes it,
//! and the reference from plain candle ops that the kernel is tested against; and a
//! whole pre-norm layer of such pieces as one fused op ([`fused_layer`]), whose
//! reference is the layer composed of its parts.

use candle::{Result, Tensor, D};
use candle_nn::{kv_cache::KvCache, LayerNorm};
use flow_kernels::{fused, transformer_layer::LayerShape, Op};

use crate::Mlp;

/// Queries per chunk of the reference causal attention. A sequence of at most this
/// many tokens is one chunk with one `T × T` mask; a longer one is cut into chunks
/// of queries, each against the keys up to its end, so that no `T × T` mask exists,
/// the scores held at once are `chunk × T` per head, and the products above the
/// diagonal's chunks are never computed. (The fused kernel visits, for each query,
/// the keys up to its position and needs no mask.)
pub const QUERY_CHUNK: usize = 64;

/// Whether `t` takes part in a graph that gradients flow through.
fn tracked(t: &Tensor) -> bool {
    t.track_op()
}

/// Layer norm over the last dimension with `ln`'s weight, bias and `ε`: the fused op
/// where it applies, the reference otherwise.
pub fn layer_norm(x: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
    match ln.bias() {
        Some(b) if fused(Op::LayerNorm, x) => {
            flow_kernels::transformer::layer_norm(x, ln.weight(), b, ln.eps())
        }
        _ => layer_norm_reference(x, ln),
    }
}

/// [`layer_norm`] from plain candle ops (two-pass mean and variance).
pub fn layer_norm_reference(x: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
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

/// Multi-head causal self-attention over sequences of `tokens` tokens, from rows of
/// queries, keys and values `(batch·T, 3·width)` (each `width` wide, head `h` at
/// columns `h·d .. (h + 1)·d` of its part) to the heads' outputs side by side,
/// `(batch·T, width)`: for token `i`, `Σ_{j ≤ i} softmax_j(q_i·k_j / √d) v_j`.
#[derive(Debug, Clone)]
pub struct CausalSelfAttention {
    heads: usize,
    tokens: usize,
    /// The reference's query chunks: start, length and additive mask
    /// `(length, start + length)`, 0 where the query may see the key and `−∞` elsewhere.
    chunks: Vec<(usize, usize, Tensor)>,
}

impl CausalSelfAttention {
    /// For `heads` heads over sequences of `tokens`; the reference's masks in `dtype`
    /// on `device`.
    pub fn new(
        heads: usize,
        tokens: usize,
        dtype: candle::DType,
        device: &candle::Device,
    ) -> Result<Self> {
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < tokens {
            let len = QUERY_CHUNK.min(tokens - start);
            let keys = start + len;
            let mask: Vec<f64> = (0..len)
                .flat_map(|i| {
                    (0..keys).map(move |j| {
                        if j <= start + i {
                            0.0
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (len, keys), device)?.to_dtype(dtype)?;
            chunks.push((start, len, mask));
            start = keys;
        }
        Ok(Self {
            heads,
            tokens,
            chunks,
        })
    }

    /// The outputs of every token of `batch` sequences: the fused op where it
    /// applies, the reference otherwise.
    pub fn forward(&self, qkv: &Tensor, batch: usize) -> Result<Tensor> {
        if fused(Op::Attention, qkv) {
            flow_kernels::transformer::causal_attention(qkv, batch, self.heads)
        } else {
            self.forward_reference(qkv, batch)
        }
    }

    /// `(3, batch, heads, tokens, d)` from rows `(batch·tokens, 3·width)`.
    fn split_heads(&self, qkv: &Tensor, batch: usize, tokens: usize) -> Result<Tensor> {
        let width = qkv.dim(1)? / 3;
        qkv.reshape((batch, tokens, 3, self.heads, width / self.heads))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()
    }

    /// Heads `(batch, heads, tokens, d)` back to rows `(batch·tokens, width)`.
    fn merge_heads(a: &Tensor) -> Result<Tensor> {
        let (batch, _, tokens, _) = a.dims4()?;
        a.transpose(1, 2)?
            .contiguous()?
            .reshape((batch * tokens, ()))
    }

    /// [`forward`](Self::forward) from plain candle ops: per chunk of queries, the
    /// scores of all heads as one batched product, the mask, a softmax and the values'
    /// product.
    pub fn forward_reference(&self, qkv: &Tensor, batch: usize) -> Result<Tensor> {
        let heads = self.split_heads(qkv, batch, self.tokens)?;
        let (q, k, v) = (heads.get(0)?, heads.get(1)?, heads.get(2)?);
        let d = q.dim(D::Minus1)?;
        let q = q.affine(1.0 / (d as f64).sqrt(), 0.0)?;
        let mut outs = Vec::with_capacity(self.chunks.len());
        for (start, len, mask) in &self.chunks {
            let keys = start + len;
            let (q, k, v) = if self.chunks.len() == 1 {
                (q.clone(), k.clone(), v.clone())
            } else {
                (
                    q.narrow(2, *start, *len)?.contiguous()?,
                    k.narrow(2, 0, keys)?.contiguous()?,
                    v.narrow(2, 0, keys)?.contiguous()?,
                )
            };
            let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
            let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
            outs.push(weights.matmul(&v)?);
        }
        let a = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 2)?
        };
        Self::merge_heads(&a)
    }

    /// The outputs of the next token of each sequence, from its queries, keys and
    /// values `(batch, 3·width)`, against the keys and values of the tokens before it
    /// in `cache` (which this extends). No mask: the cache holds only the past and
    /// present. Where no gradient is tracked, candle-nn's fused softmax.
    pub fn step(&self, qkv: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let batch = qkv.dim(0)?;
        let heads = self.split_heads(qkv, batch, 1)?;
        let (k, v) = cache.append(&heads.get(1)?, &heads.get(2)?)?;
        let q = heads.get(0)?;
        let d = q.dim(D::Minus1)?;
        let scores = q
            .affine(1.0 / (d as f64).sqrt(), 0.0)?
            .matmul(&k.contiguous()?.t()?)?;
        let weights = if tracked(&scores) {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        Self::merge_heads(&weights.matmul(&v.contiguous()?)?)
    }

    /// A fresh key-value cache for [`step`](Self::step): keys and values of up to
    /// `tokens` positions.
    pub fn cache(&self) -> KvCache {
        KvCache::new(2, self.tokens)
    }
}

/// The parts of a pre-norm Transformer layer, `h₁ = h + proj(attention(qkv(norm1(h))))`
/// then `h₁ + mlp(norm2(h₁))`, as [`fused_layer`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct LayerParts<'a> {
    pub norm1: &'a LayerNorm,
    /// Queries, keys and values of every head in one linear map.
    pub qkv: &'a Mlp,
    pub attention: &'a CausalSelfAttention,
    pub proj: &'a Mlp,
    pub norm2: &'a LayerNorm,
    /// A plain network of one hidden layer, back to the embedding width.
    pub mlp: &'a Mlp,
}

/// The whole layer over `batch` sequences `h` `(batch·T, width)` as one op with its own
/// backward ([`flow_kernels::transformer_layer`]) where [`flow_kernels::fused`] takes it
/// and the parts have its shape; `None` otherwise, for the caller to compose the
/// layer from its parts.
pub fn fused_layer(h: &Tensor, batch: usize, parts: LayerParts) -> Result<Option<Tensor>> {
    let LayerParts {
        norm1,
        qkv,
        attention,
        proj,
        norm2,
        mlp,
    } = parts;
    let (Some(b1), Some(b2)) = (norm1.bias(), norm2.bias()) else {
        return Ok(None);
    };
    let nets = [qkv, proj, mlp];
    let ok = fused(Op::TransformerLayer, h)
        && nets.iter().all(|n| n.is_plain() && n.uses_fused(h))
        && qkv.layers().len() == 1
        && proj.layers().len() == 1
        && mlp.layers().len() == 2
        && norm1.eps() == norm2.eps();
    if !ok {
        return Ok(None);
    }
    // Every layer has its bias: `uses_fused` checked.
    let packed = |net: &Mlp| -> Result<Vec<Tensor>> {
        net.layers()
            .iter()
            .map(|l| match l.bias() {
                Some(b) => flow_kernels::pack_linear(l.weight(), b),
                None => candle::bail!("fused networks need biases"),
            })
            .collect()
    };
    let mut params = vec![norm1.weight().clone(), b1.clone()];
    params.extend(packed(qkv)?);
    params.extend(packed(proj)?);
    params.extend([norm2.weight().clone(), b2.clone()]);
    params.extend(packed(mlp)?);
    let shape = LayerShape {
        batch,
        heads: attention.heads,
        width: h.dim(1)?,
        hidden: mlp.layers()[0].weight().dim(0)?,
        activation: mlp.activation(),
        eps: norm1.eps(),
    };
    let params = Tensor::cat(&params, 0)?;
    flow_kernels::transformer_layer::transformer_layer(h, &params, shape).map(Some)
}
