use rand::{rngs::StdRng, SeedableRng};

use crate::{
    cli::SampleArgs,
    commands::{device, host_values, load_model},
    output::{check_writable, header, write_csv},
    plot, CmdResult,
};

pub fn run(a: SampleArgs) -> CmdResult {
    check_writable(&a.out)?;
    if let Some(p) = &a.plot {
        check_writable(p)?;
    }
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        return Err(format!("--temperature must be positive, got {}", a.temperature).into());
    }
    if a.n == 0 {
        return Err("--n must be at least 1".into());
    }
    let device = device(&a.device)?;
    let model = load_model(&a.model, &device)?;
    let dim = model.flow.dim();
    if a.plot.is_some() && dim != 2 {
        return Err(format!("--plot draws 2-D models; this one has {dim} features").into());
    }
    let mut rng = StdRng::seed_from_u64(a.seed);
    let x = model
        .flow
        .sample_with_temperature(a.n, a.temperature, &mut rng)?;
    let values = host_values(&x)?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        eprintln!("warning: {bad} sample values are not finite");
    }
    write_csv(&a.out, &header("x", dim), &values, dim)?;
    if let Some(p) = &a.plot {
        let finite: Vec<f32> = values
            .chunks(2)
            .filter(|r| r.iter().all(|v| v.is_finite()))
            .flatten()
            .copied()
            .collect();
        plot::scatter(p, &finite)?;
    }
    eprintln!("wrote {} samples to {}", a.n, a.out.display());
    Ok(())
}
