use flow_models::ModelDensity;
use rand::{rngs::StdRng, SeedableRng};

use crate::{
    cli::PlotArgs,
    commands::{device, host_values, load_input, load_model, parse_context},
    output::{check_distinct, check_writable, header, Format},
    plot::{density, title, PlotOptions},
    CmdResult,
};

/// Draws of the model that frame its density when neither `--range` nor `--data` does.
const FRAME_SAMPLES: usize = 5000;

pub fn run(a: PlotArgs) -> CmdResult {
    Format::of(&a.out, "--out", &[Format::Png])?;
    check_writable(&a.out)?;
    let mut read = vec![("--model", a.model.as_path())];
    read.extend(a.data.as_deref().map(|d| ("--data", d)));
    check_distinct("--out", &a.out, &read)?;
    let device = device(&a.device)?;
    let model = load_model(&a.model, &device)?;
    let dim = model.flow.dim();
    if dim != 2 {
        return Err(format!("plot draws 2-D models; this one has {dim} features").into());
    }
    let context_dim = model.checkpoint.config.context_dim;
    let context = parse_context(a.context.as_deref(), context_dim, &device)?;
    let mut model_density = ModelDensity::new(&model.checkpoint.config, &model.flow)?;
    let points = match &a.data {
        Some(p) => Some(load_input(p, dim, context_dim)?.data.values),
        None => None,
    };
    // The range: the one given, or the data's, or the model's own samples'.
    let samples = match (&points, a.range) {
        (None, None) => {
            let rng = &mut StdRng::seed_from_u64(0);
            let s = model_density.sample(FRAME_SAMPLES, 1.0, context.as_ref(), rng)?;
            host_values(&s)?
        }
        _ => Vec::new(),
    };
    let condition = a.context.as_deref().map(|c| format!("context {c}"));
    let options = PlotOptions::new(title(&a.model, condition.as_deref()))
        .with_axes(&header("x", dim))
        .with_range(a.range);
    density(
        &a.out,
        &mut model_density,
        context.as_ref(),
        &device,
        points.as_deref().unwrap_or(&samples),
        points.as_deref(),
        &options,
    )?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
