//! The fused layer norm and causal attention against their plain candle references:
//! the same values and gradients (to float rounding), in f32 and f64, for a short
//! sequence (one chunk of queries in the reference) and a long one (several), and a
//! network without hidden layers (a linear map) fused as the others are.

use anyhow::{ensure, Result};
use candle::{DType, Device, Module, Tensor, Var};
use candle_nn::{LayerNorm, VarMap};
use flow_core::{sampling::randn, seeded_var_builder};
use flow_nn::{
    transformer::{layer_norm, layer_norm_reference, CausalSelfAttention, QUERY_CHUNK},
    Activation, Mlp, NetConfig,
};
use rand::{rngs::StdRng, SeedableRng};

const DEV: Device = Device::Cpu;

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1.0);
    Ok(diff / scale)
}

fn draw(rows: usize, cols: usize, dtype: DType, seed: u64) -> Result<Var> {
    let t = randn(rows, cols, dtype, &DEV, &mut StdRng::seed_from_u64(seed))?;
    Ok(Var::from_tensor(&t)?)
}

/// `f` and `g` on the same inputs: values, and the gradients of a weighted sum of the
/// outputs to each input, within `tol`.
fn same(
    what: &str,
    inputs: &[&Var],
    f: impl Fn() -> candle::Result<Tensor>,
    g: impl Fn() -> candle::Result<Tensor>,
    tol: f64,
) -> Result<()> {
    let (a, b) = (f()?, g()?);
    ensure!(
        rel_err(&a, &b)? < tol,
        "{what}: values differ by {}",
        rel_err(&a, &b)?
    );
    let w = randn(
        a.dim(0)?,
        a.dim(1)?,
        a.dtype(),
        &DEV,
        &mut StdRng::seed_from_u64(99),
    )?;
    let (ga, gb) = (
        (a * &w)?.sum_all()?.backward()?,
        (b * &w)?.sum_all()?.backward()?,
    );
    for (i, v) in inputs.iter().enumerate() {
        let (Some(x), Some(y)) = (ga.get(v.as_tensor()), gb.get(v.as_tensor())) else {
            anyhow::bail!("{what}: no gradient for input {i}");
        };
        let e = rel_err(x, y)?;
        ensure!(e < tol, "{what}: gradients of input {i} differ by {e}");
    }
    Ok(())
}

#[test]
fn the_fused_layer_norm_is_the_reference() -> Result<()> {
    // 37 rows run as one block; 300 (at least 256) in blocks across the threads, whose
    // sums of ∂w and ∂b are then added.
    let cases = [
        (37, DType::F64, 1e-12),
        (37, DType::F32, 1e-5),
        (300, DType::F64, 1e-12),
    ];
    for (rows, dtype, tol) in cases {
        let x = draw(rows, 24, dtype, 1)?;
        let w = draw(1, 24, dtype, 2)?;
        let b = draw(1, 24, dtype, 3)?;
        let ln = LayerNorm::new(w.as_tensor().squeeze(0)?, b.as_tensor().squeeze(0)?, 1e-5);
        // Rows shifted off zero mean, so that the mean matters.
        let xs = || x.as_tensor() + 3.0;
        same(
            &format!("layer norm of {rows} rows, {dtype:?}"),
            &[&x, &w, &b],
            || layer_norm(&xs()?, &ln),
            || layer_norm_reference(&xs()?, &ln),
            tol,
        )?;
    }
    Ok(())
}

#[test]
fn the_fused_causal_attention_is_the_reference() -> Result<()> {
    // The kernel takes sequences sixteen at a time: 19 fills one group and part of the
    // next, with more than 256 rows so that the groups run in parallel. It sums over a
    // head's columns four at a time: heads of 8 columns, and of 10 for 9 sequences.
    let cases = [
        (16, 4, 32, 19),
        (5, 2, 20, 9),
        (2 * QUERY_CHUNK + 9, 2, 8, 3),
        (1, 1, 4, 3),
    ];
    for (tokens, heads, width, batch) in cases {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let attention = CausalSelfAttention::new(heads, tokens, dtype, &DEV)?;
            let qkv = draw(batch * tokens, 3 * width, dtype, 4)?;
            same(
                &format!("attention over {tokens} tokens in {heads} heads, {dtype:?}"),
                &[&qkv],
                || attention.forward(qkv.as_tensor(), batch),
                || attention.forward_reference(qkv.as_tensor(), batch),
                tol,
            )?;
        }
    }
    Ok(())
}

#[test]
fn attention_token_by_token_with_a_cache_is_attention_over_the_sequence() -> Result<()> {
    let (batch, tokens, heads, width) = (2, 7, 2, 8);
    let attention = CausalSelfAttention::new(heads, tokens, DType::F64, &DEV)?;
    let qkv = draw(batch * tokens, 3 * width, DType::F64, 5)?;
    let whole = attention.forward(qkv.as_tensor(), batch)?;
    let rows = qkv.as_tensor().reshape((batch, tokens, 3 * width))?;
    let mut cache = attention.cache();
    for t in 0..tokens {
        let step = attention.step(&rows.narrow(1, t, 1)?.squeeze(1)?, &mut cache)?;
        let want = whole
            .reshape((batch, tokens, width))?
            .narrow(1, t, 1)?
            .squeeze(1)?;
        ensure!(rel_err(&step, &want)? < 1e-12, "token {t} differs");
    }
    Ok(())
}

#[test]
fn a_network_without_hidden_layers_is_a_fused_linear_map() -> Result<()> {
    let varmap = VarMap::new();
    let cfg = NetConfig::Mlp {
        hidden: Vec::new(),
        activation: Activation::Relu,
    };
    let net = Mlp::new(
        &cfg,
        12,
        20,
        false,
        seeded_var_builder(&varmap, 1, DType::F64, &DEV),
    )?;
    let x = draw(50, 12, DType::F64, 6)?;
    ensure!(net.uses_fused(x.as_tensor()), "not fused");
    let linear = &net.layers()[0];
    same(
        "linear",
        &[&x],
        || net.forward(x.as_tensor()),
        || linear.forward(x.as_tensor()),
        1e-12,
    )
}
