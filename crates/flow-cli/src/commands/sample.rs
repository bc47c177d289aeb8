use flow_train::data::{load_path, Dataset};
use rand::{rngs::StdRng, SeedableRng};

use crate::{
    cli::SampleArgs,
    commands::{device, host_values, load_model, parse_context, with_context},
    output::{check_writable, header, write_csv},
    plot, CmdResult, Failure,
};

/// The number of samples and their condition (one row per sample), from the flags.
fn conditions(a: &SampleArgs, context_dim: usize) -> Result<(usize, Dataset), Failure> {
    let Some(path) = &a.context_file else {
        let n =
            a.n.ok_or("--n is required (or --context-file, one sample per row)")?;
        let host = candle::Device::Cpu;
        let context = match parse_context(a.context.as_deref(), context_dim, &host)? {
            Some(c) => c.flatten_all()?.to_vec1::<f32>()?.repeat(n),
            None => Vec::new(),
        };
        return Ok((
            n,
            Dataset {
                context_dim,
                context,
                ..Dataset::new(0, Vec::new())
            },
        ));
    };
    if context_dim == 0 {
        return Err("--context-file: the model is not conditional".into());
    }
    let rows = load_path(path)?;
    if rows.dim != context_dim {
        return Err(format!(
            "{}: {} values per row, the model takes {context_dim} context features",
            path.display(),
            rows.dim
        )
        .into());
    }
    let n = rows.len();
    if a.n.is_some_and(|want| want != n) {
        return Err(format!(
            "--n {} but {} has {n} rows",
            a.n.unwrap_or(0),
            path.display()
        )
        .into());
    }
    Ok((
        n,
        Dataset {
            context_dim,
            context: rows.values,
            ..Dataset::new(0, Vec::new())
        },
    ))
}

pub fn run(a: SampleArgs) -> CmdResult {
    check_writable(&a.out)?;
    if let Some(p) = &a.plot {
        check_writable(p)?;
    }
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        return Err(format!("--temperature must be positive, got {}", a.temperature).into());
    }
    let device = device(&a.device)?;
    let model = load_model(&a.model, &device)?;
    let dim = model.flow.dim();
    let (n, given) = conditions(&a, model.checkpoint.config.context_dim)?;
    if n == 0 {
        return Err("--n must be at least 1".into());
    }
    if a.plot.is_some() && dim != 2 {
        return Err(format!("--plot draws 2-D models; this one has {dim} features").into());
    }
    let context = given.context_tensor(&device)?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let x = model
        .flow
        .sample_with_context(n, a.temperature, context.as_ref(), &mut rng)?;
    let values = host_values(&x)?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        eprintln!("warning: {bad} sample values are not finite");
    }
    let (rows, names, width) = with_context(values.clone(), header("x", dim), &given);
    write_csv(&a.out, &names, &rows, width)?;
    if let Some(p) = &a.plot {
        let finite: Vec<f32> = values
            .chunks(2)
            .filter(|r| r.iter().all(|v| v.is_finite()))
            .flatten()
            .copied()
            .collect();
        plot::scatter(p, &finite)?;
    }
    eprintln!("wrote {n} samples to {}", a.out.display());
    Ok(())
}
