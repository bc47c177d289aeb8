//! A flow assembled by hand from the bijectors in `flow-core` and `flow-realnvp`,
//! with the change-of-variables bookkeeping checked on the way: encoding and decoding
//! invert each other, and the density integrates to one over the plane.
//!
//! ```sh
//! cargo run --release --example custom_flow
//! ```

use anyhow::Result;
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Chain, Flow, Reverse, StandardNormal};
use flow_realnvp::{
    Activation, Affine, AffineCoupling, ConditionerConfig, CouplingConfig, NetConfig, Nets,
    OutputLayout, ScaleMap,
};

fn main() -> Result<()> {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 3, DType::F64, &device);

    // Keep feature 0 and transform feature 1 with `s`, `t` nets of 64 tanh units.
    let cfg = CouplingConfig {
        mask: vec![true, false],
        conditioner: ConditionerConfig {
            nets: Nets::Separate,
            layout: OutputLayout::default(),
            net: NetConfig::Mlp {
                hidden: vec![64],
                activation: Activation::Tanh,
            },
            zero_init: false,
        },
        transform: Affine::new(ScaleMap::default()),
        inverted: false,
        context_dim: 0,
    };
    // Coupling, swap the features, coupling: applied in list order from data to latent.
    let chain = Chain::new(vec![
        Box::new(AffineCoupling::new(&cfg, vb.pp("c0"))?),
        Box::new(Reverse::new(2, &device)?),
        Box::new(AffineCoupling::new(&cfg, vb.pp("c1"))?),
    ]);
    let flow = Flow::new(chain, StandardNormal::new(2, DType::F64, &device));

    let x = Tensor::randn(0f64, 1.0, (5, 2), &device)?;
    let z = flow.encode(&x)?;
    let back = flow.decode(&z)?;
    let err = (back - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
    println!("round trip error: {err:.2e}");

    // Riemann sum of p(x) over [-8, 8]²: should be 1 up to the grid's resolution.
    let (n, half) = (400usize, 8.0f64);
    let h = 2.0 * half / n as f64;
    let axis: Vec<f64> = (0..n).map(|i| -half + (i as f64 + 0.5) * h).collect();
    let grid: Vec<f64> = axis
        .iter()
        .flat_map(|&a| axis.iter().flat_map(move |&b| [a, b]))
        .collect();
    let grid = Tensor::from_vec(grid, (n * n, 2), &device)?;
    let mass = flow.log_prob(&grid)?.exp()?.sum_all()?.to_scalar::<f64>()? * h * h;
    println!("∫ p(x) dx ≈ {mass:.4}");
    Ok(())
}
