//! A batch split into parts: the loss and gradients [`nll_and_gradients`] adds up from
//! the parts against one pass over the whole batch, and the cases that must stay whole.

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Bijector, Chain, Flow, StandardNormal};
use flow_maf::MafConfig;
use flow_models::ModelConfig;
use flow_nn::Nets;
use flow_nsf::NsfConfig;
use flow_realnvp::RealNvpConfig;
use flow_train::{batch_parts, nll_and_gradients, parts_of, MIN_PART_ROWS};

/// The model's flow in f64 and its variables, in a fixed order.
fn build(model: &ModelConfig) -> Result<(Flow, Vec<Var>)> {
    let varmap = VarMap::new();
    let flow = model.build(seeded_var_builder(&varmap, 3, DType::F64, &Device::Cpu))?;
    let mut named: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("variable map poisoned"))?
        .clone()
        .into_iter()
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((flow, named.into_iter().map(|(_, v)| v).collect()))
}

/// `(rows, cols)` values of both signs, the same in every call.
fn values(rows: usize, cols: usize, salt: usize) -> Result<Tensor> {
    let v: Vec<f64> = (0..rows * cols)
        .map(|i| (((i * 37 + salt * 11) % 101) as f64 / 50.0 - 1.0) * 1.5)
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
}

/// Largest difference between two gradient lists, relative to the largest entry.
fn max_rel(a: &[Option<Tensor>], b: &[Option<Tensor>]) -> Result<f64> {
    ensure!(
        a.len() == b.len(),
        "{} against {} gradients",
        a.len(),
        b.len()
    );
    let (mut diff, mut scale) = (0f64, 0f64);
    for (a, b) in a.iter().zip(b) {
        match (a, b) {
            (Some(a), Some(b)) => {
                let a = a.flatten_all()?.to_vec1::<f64>()?;
                let b = b.flatten_all()?.to_vec1::<f64>()?;
                for (x, y) in a.iter().zip(&b) {
                    diff = diff.max((x - y).abs());
                    scale = scale.max(x.abs());
                }
            }
            (None, None) => {}
            _ => anyhow::bail!("a gradient present in one list only"),
        }
    }
    Ok(diff / scale.max(1e-300))
}

#[test]
fn parts_add_up_to_the_gradient_of_the_whole_batch() -> Result<()> {
    let models = [
        (
            "RealNVP, separate nets",
            ModelConfig::realnvp(&RealNvpConfig::new(3).with_hidden(16)),
        ),
        (
            "RealNVP, joint net, two hidden layers",
            ModelConfig::realnvp(
                &RealNvpConfig::new(3)
                    .with_hidden(16)
                    .with_hidden_layers(2)
                    .with_nets(Nets::Joint),
            ),
        ),
        ("NSF", ModelConfig::nsf(&NsfConfig::new(3).with_hidden(16))),
        ("MAF", ModelConfig::maf(&MafConfig::new(3).with_hidden(16))),
    ];
    // 100 rows in 3 parts of 33, 33 and 34.
    let x = values(100, 3, 0)?;
    for (name, model) in models {
        let (flow, vars) = build(&model)?;
        let (nll, whole) = nll_and_gradients(&flow, &vars, &x, None, 1)?;
        let (nll3, parts) = nll_and_gradients(&flow, &vars, &x, None, 3)?;
        let whole = whole.expect("a finite loss");
        let parts = parts.expect("a finite loss");
        // The loss is the batch's mean NLL.
        let direct = -flow.log_prob(&x)?.mean_all()?.to_scalar::<f64>()?;
        ensure!(
            (nll - direct).abs() < 1e-12,
            "{name}: {nll} against {direct}"
        );
        ensure!(
            (nll3 - direct).abs() < 1e-12,
            "{name}: parts {nll3} against {direct}"
        );
        ensure!(
            whole.iter().all(Option::is_some),
            "{name}: a variable without gradient"
        );
        let rel = max_rel(&whole, &parts)?;
        ensure!(
            rel < 1e-12,
            "{name}: gradients of the parts differ by {rel:e}"
        );
    }
    Ok(())
}

#[test]
fn a_conditional_flow_splits_its_context_with_the_rows() -> Result<()> {
    let model = ModelConfig::realnvp(&RealNvpConfig::new(2).with_hidden(8).with_context_dim(2));
    let (flow, vars) = build(&model)?;
    let (x, c) = (values(40, 2, 1)?, values(40, 2, 2)?);
    let (nll, whole) = nll_and_gradients(&flow, &vars, &x, Some(&c), 1)?;
    let (nll2, parts) = nll_and_gradients(&flow, &vars, &x, Some(&c), 2)?;
    ensure!((nll - nll2).abs() < 1e-12, "{nll} against {nll2}");
    let rel = max_rel(&whole.expect("finite"), &parts.expect("finite"))?;
    ensure!(rel < 1e-12, "gradients differ by {rel:e}");
    Ok(())
}

#[test]
fn a_non_finite_part_gives_no_gradient() -> Result<()> {
    let (flow, vars) = build(&ModelConfig::realnvp(&RealNvpConfig::new(2).with_hidden(8)))?;
    let mut v = values(10, 2, 0)?.flatten_all()?.to_vec1::<f64>()?;
    v[15] = f64::NAN;
    let x = Tensor::from_vec(v, (10, 2), &Device::Cpu)?;
    for parts in [1, 2] {
        let (nll, grads) = nll_and_gradients(&flow, &vars, &x, None, parts)?;
        ensure!(nll.is_nan() && grads.is_none(), "{parts} parts: {nll}");
    }
    Ok(())
}

/// The identity, declaring that it uses the batch's statistics (as batch norm does
/// while training).
#[derive(Debug)]
struct BatchWide;

impl Bijector for BatchWide {
    fn forward(&self, x: &Tensor) -> candle::Result<(Tensor, Tensor)> {
        Ok((x.clone(), x.zeros_like()?.sum(1)?))
    }
    fn inverse(&self, z: &Tensor) -> candle::Result<(Tensor, Tensor)> {
        self.forward(z)
    }
    fn batch_statistics(&self) -> bool {
        true
    }
}

#[test]
fn a_layer_with_batch_statistics_keeps_the_batch_whole() -> Result<()> {
    let dev = Device::Cpu;
    let flow = Flow::new(
        Chain::new(vec![Box::new(BatchWide)]),
        StandardNormal::new(2, DType::F64, &dev),
    );
    ensure!(
        flow.batch_statistics(),
        "the chain hides its layer's batch statistics"
    );
    ensure!(batch_parts(4096, &flow, &dev) == 1);
    Ok(())
}

/// One part per thread, each of at least `MIN_PART_ROWS` rows. (The split itself runs
/// end to end in the `flow` binary's tests, which pin candle's threads as the binary
/// does; a test process leaves candle its own pool, and [`batch_parts`] then keeps a
/// batch whole.)
#[test]
fn parts_follow_the_threads_and_the_rows() -> Result<()> {
    let m = MIN_PART_ROWS;
    for (batch, threads, parts) in [
        (512, 2, 2),
        (512, 8, 8),
        (2 * m, 2, 2),
        (2 * m - 1, 2, 1),
        (3 * m + 5, 8, 3),
        (m - 1, 4, 1),
        (0, 4, 1),
        (4096, 1, 1),
    ] {
        let got = parts_of(batch, threads);
        ensure!(
            got == parts,
            "{batch} rows on {threads} threads: {got} parts, expected {parts}"
        );
    }
    Ok(())
}
