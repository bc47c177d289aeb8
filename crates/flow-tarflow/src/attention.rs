//! Causal multi-head self-attention through matrix products, over a whole sequence or
//! one position at a time against a key-value cache.

use candle::{DType, Device, Result, Tensor, D};

/// Queries per chunk of causal attention. A sequence of at most this many tokens is
/// one chunk with one `T × T` mask; a longer one is cut into chunks of queries, each
/// against the keys up to its end, so that no `T × T` mask exists, the scores held at
/// once are `chunk × T` per head, and the products above the diagonal's chunks are
/// never computed.
pub const QUERY_CHUNK: usize = 64;

/// Whether `t` takes part in a graph that gradients flow through. candle's fused
/// softmax and layer norm have no backward pass, so such tensors take the plain ops.
pub(crate) fn tracked(t: &Tensor) -> bool {
    t.track_op()
}

/// Softmax over the last dimension: candle-nn's fused op where no gradient is needed,
/// its differentiable composition otherwise.
pub(crate) fn softmax(x: &Tensor) -> Result<Tensor> {
    if tracked(x) {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// The query chunks of a causal sequence of `tokens`, each with its additive mask
/// `(len, start + len)`: 0 where query `start + i` may see key `j` (`j ≤ start + i`),
/// `−∞` elsewhere.
#[derive(Debug, Clone)]
pub(crate) struct CausalMask {
    chunks: Vec<(usize, usize, Tensor)>,
}

impl CausalMask {
    pub(crate) fn new(tokens: usize, dtype: DType, device: &Device) -> Result<Self> {
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
        Ok(Self { chunks })
    }

    /// `softmax(q kᵀ / √d + mask) v` for `q`, `k`, `v` `(batch, heads, T, d)`.
    pub(crate) fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let d = q.dim(D::Minus1)?;
        let q = q.affine(1.0 / (d as f64).sqrt(), 0.0)?;
        let mut outs = Vec::with_capacity(self.chunks.len());
        for (start, len, mask) in &self.chunks {
            let keys = start + len;
            let (q, k, v) = if self.chunks.len() == 1 {
                (q.clone(), k.clone(), v.clone())
            } else {
                (
                    q.narrow(2, *start, *len)?,
                    k.narrow(2, 0, keys)?,
                    v.narrow(2, 0, keys)?,
                )
            };
            let scores = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
            let weights = softmax(&scores.broadcast_add(mask)?)?;
            outs.push(weights.matmul(&v.contiguous()?)?);
        }
        if outs.len() == 1 {
            return Ok(outs.remove(0));
        }
        Tensor::cat(&outs, 2)
    }
}

/// One query per row against every cached key: `q` `(batch, heads, 1, d)`, `k`, `v`
/// `(batch, heads, t, d)` for the `t` positions so far; no mask, since the cache holds
/// only the past and present.
pub(crate) fn attend_cached(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let q = q.affine(1.0 / (d as f64).sqrt(), 0.0)?;
    let scores = q.matmul(&k.contiguous()?.t()?)?;
    softmax(&scores)?.matmul(&v.contiguous()?)
}
