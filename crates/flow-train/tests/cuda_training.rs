//! Training on a GPU against the CPU (with the `cuda` feature). In a test binary of its
//! own: it sets the process-wide fusion switch, which other tests' bit-for-bit
//! comparisons must not see change.
#![cfg(feature = "cuda")]

use anyhow::{ensure, Result};
use candle::{DType, Device};
use flow_realnvp::RealNvpConfig;
use flow_train::{
    data::{generate, Toy},
    Duration, Report, Reporter, TrainConfig, Trainer,
};

/// Every tensor of a model, by name, as f64.
type Weights = Vec<(String, Vec<f64>)>;

/// The same short runs on a GPU, fused kernels off and on, against the CPU: every
/// reported batch loss and the final weights agree. Without a GPU this is skipped,
/// unless `FLOWS_REQUIRE_CUDA=1` (set by `scripts/gpu-check.sh`) makes that a failure.
#[test]
fn cuda_training_matches_the_cpu() -> Result<()> {
    struct Losses(Vec<f64>);
    impl Reporter for Losses {
        fn report(&mut self, r: &Report) {
            self.0.push(r.loss);
        }
    }
    let Some(gpu) = flow_core::cuda_if_present()? else {
        return Ok(());
    };
    let train = generate(Toy::Moons, 2000, Some(0.05), 4)?;
    let val = generate(Toy::Moons, 500, Some(0.05), 5)?;
    // The reference job's model, and zuko's default conditioner depth.
    let models = [
        RealNvpConfig::new(2),
        RealNvpConfig::new(2)
            .with_layers(6)
            .with_hidden(64)
            .with_hidden_layers(2)
            .with_activation(flow_nn::Activation::Relu),
    ];
    for (dtype, tol) in [(DType::F64, 1e-7), (DType::F32, 2e-3)] {
        for model in &models {
            let cfg = TrainConfig::new(model.clone())
                .with_duration(Duration::Steps(25))
                .with_batch_size(256)
                .with_val_every(10)
                .with_report_every(1);
            let run = |dev: &Device| -> Result<(Vec<f64>, Weights)> {
                let mut losses = Losses(Vec::new());
                let t = Trainer::new(cfg.clone(), dev)?.with_dtype(dtype).fit(
                    &train,
                    Some(&val),
                    &mut losses,
                )?;
                let mut w: Vec<(String, Vec<f64>)> = t
                    .varmap
                    .data()
                    .lock()
                    .expect("lock")
                    .iter()
                    .map(|(k, v)| {
                        let v = v.as_tensor().to_dtype(DType::F64)?.flatten_all()?;
                        Ok((k.clone(), v.to_vec1::<f64>()?))
                    })
                    .collect::<Result<_>>()?;
                w.sort_by(|a, b| a.0.cmp(&b.0));
                Ok((losses.0, w))
            };
            let (cpu_losses, cpu_weights) = run(&Device::Cpu)?;
            ensure!(cpu_losses.len() >= 25, "{} reports", cpu_losses.len());
            for fused in [false, true] {
                flow_kernels::set_fusion(fused);
                let (losses, weights) = run(&gpu)?;
                ensure!(losses.len() == cpu_losses.len());
                for (step, (a, b)) in losses.iter().zip(&cpu_losses).enumerate() {
                    ensure!(
                        (a - b).abs() <= tol * b.abs().max(1.0),
                        "{dtype:?} fusion {fused}: loss at report {step} is {a}, CPU {b}"
                    );
                }
                ensure!(weights.len() == cpu_weights.len(), "different tensors");
                for ((name, a), (cpu_name, b)) in weights.iter().zip(&cpu_weights) {
                    ensure!(
                        name == cpu_name && a.len() == b.len(),
                        "{name} against {cpu_name}"
                    );
                    let e = a
                        .iter()
                        .zip(b)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    ensure!(
                        e <= 10.0 * tol,
                        "{dtype:?} fusion {fused}: {name} differs by {e:e} after training"
                    );
                }
            }
        }
    }
    Ok(())
}
