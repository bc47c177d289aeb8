use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::seeded_var_builder;
use flow_realnvp::{ModelConfig, RealNvpConfig};
use flow_train::{Adam, OptimizerConfig};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let m = ModelConfig::from_realnvp(&RealNvpConfig::new(2));
    let flow = m.build(seeded_var_builder(&vm, 0, DType::F32, &dev))?;
    let vars: Vec<_> = vm.all_vars();
    let mut adam = Adam::new(vars.clone(), OptimizerConfig::default())?;
    let x = Tensor::randn(0f32, 1., (512, 2), &dev)?;
    let (mut tf, mut tb, mut ta) = (0.0, 0.0, 0.0);
    let n = 200;
    for _ in 0..n {
        let t0 = Instant::now();
        let loss = flow.log_prob(&x)?.mean_all()?.neg()?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let g = loss.backward()?;
        let grads: Vec<_> = vars.iter().map(|v| g.get(v.as_tensor()).cloned()).collect();
        let t2 = Instant::now();
        adam.step(&grads, 1e-4)?;
        let t3 = Instant::now();
        tf += (t1 - t0).as_secs_f64();
        tb += (t2 - t1).as_secs_f64();
        ta += (t3 - t2).as_secs_f64();
    }
    println!(
        "per step: forward {:.2} ms, backward {:.2} ms, adam {:.2} ms",
        tf / n as f64 * 1e3,
        tb / n as f64 * 1e3,
        ta / n as f64 * 1e3
    );
    let big = Tensor::randn(0f32, 1., (100_000, 2), &dev)?;
    let t = Instant::now();
    let _ = flow.log_prob(&big)?.detach();
    println!("log_prob 100k: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
