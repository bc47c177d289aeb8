use rand::{rngs::StdRng, SeedableRng};

use crate::{
    cli::PlotArgs,
    commands::{device, host_values, load_input, load_model, parse_context},
    output::check_writable,
    plot::{density, Bounds},
    CmdResult,
};

pub fn run(a: PlotArgs) -> CmdResult {
    check_writable(&a.out)?;
    let device = device(&a.device)?;
    let model = load_model(&a.model, &device)?;
    let dim = model.flow.dim();
    if dim != 2 {
        return Err(format!("plot draws 2-D models; this one has {dim} features").into());
    }
    let context_dim = model.checkpoint.config.context_dim;
    let context = parse_context(a.context.as_deref(), context_dim, &device)?;
    let points = match &a.data {
        Some(p) => Some(load_input(p, dim, context_dim)?.data.values),
        None => None,
    };
    // Frame the data, or the model's own samples.
    let frame = match &points {
        Some(p) => p.clone(),
        None => {
            let rng = &mut StdRng::seed_from_u64(0);
            let s = model
                .flow
                .sample_with_context(5000, 1.0, context.as_ref(), rng)?;
            host_values(&s)?
                .chunks(2)
                .filter(|r| r.iter().all(|v| v.is_finite()))
                .flatten()
                .copied()
                .collect()
        }
    };
    density(
        &a.out,
        &model.flow,
        context.as_ref(),
        &device,
        Bounds::around(&frame),
        points.as_deref(),
    )?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
