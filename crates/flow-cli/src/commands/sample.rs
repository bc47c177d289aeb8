use flow_glow::ImageInfo;
use flow_io::LoadedModel;
use flow_train::data::{chunks, Dataset};
use rand::{rngs::StdRng, SeedableRng};

use crate::{
    cli::SampleArgs,
    commands::{
        device, host_values, image_chunk_rows, load_model, parse_context, with_context, CHUNK_ROWS,
    },
    output::{check_writable, header, CsvWriter},
    plot::{self, PlotOptions},
    CmdResult, Failure,
};

/// A chunk's condition: `rows` samples, each with its context row (none for an
/// unconditional model).
fn condition(rows: usize, context_dim: usize, context: Vec<f32>) -> Dataset {
    debug_assert_eq!(context.len(), rows * context_dim);
    Dataset {
        context_dim,
        context,
        ..Dataset::new(0, Vec::new())
    }
}

/// Chunks of samples to draw: how many, and their conditions.
type Conditions<'a> = Box<dyn Iterator<Item = Result<(usize, Dataset), Failure>> + 'a>;

/// The samples' conditions, [`CHUNK_ROWS`] at a time, from the flags.
fn conditions(a: &SampleArgs, context_dim: usize) -> Result<Conditions<'_>, Failure> {
    let Some(path) = &a.context_file else {
        let n =
            a.n.ok_or("--n is required (or --context-file, one sample per row)")?;
        if n == 0 {
            return Err("--n must be at least 1".into());
        }
        let host = candle::Device::Cpu;
        let row = match parse_context(a.context.as_deref(), context_dim, &host)? {
            Some(c) => c.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        let sizes = (0..n.div_ceil(CHUNK_ROWS)).map(move |i| CHUNK_ROWS.min(n - i * CHUNK_ROWS));
        return Ok(Box::new(sizes.map(move |rows| {
            Ok((rows, condition(rows, context_dim, row.repeat(rows))))
        })));
    };
    if context_dim == 0 {
        return Err("--context-file: the model is not conditional".into());
    }
    let rows = chunks(path, CHUNK_ROWS)?.map(move |c| {
        let c = c?;
        if c.dim != context_dim {
            return Err(format!(
                "{}: {} values per row, the model takes {context_dim} context features",
                path.display(),
                c.dim
            )
            .into());
        }
        Ok((c.len(), condition(c.len(), context_dim, c.values)))
    });
    Ok(Box::new(rows))
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
    if let Some(image) = model.checkpoint.config.image_info() {
        return images(&a, &model, image);
    }
    let dim = model.flow.dim();
    if a.plot.is_some() && dim != 2 {
        return Err(format!("--plot draws 2-D models; this one has {dim} features").into());
    }
    let png = a
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if a.range.is_some() && a.plot.is_none() && !png {
        return Err("--range applies to a picture: --plot FILE.png, or --out FILE.png".into());
    }
    let context_dim = model.checkpoint.config.context_dim;
    let mut names = header("x", dim);
    names.extend((0..context_dim).map(|j| format!("c{j}")));
    let mut out = CsvWriter::create(&a.out, &names)?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let (mut n, mut bad) = (0usize, 0usize);
    let mut plotted: Vec<f32> = Vec::new();
    for chunk in conditions(&a, context_dim)? {
        let (rows, given) = chunk?;
        let context = given.context_tensor(&device)?;
        let x = model
            .flow
            .sample_with_context(rows, a.temperature, context.as_ref(), &mut rng)?;
        let values = host_values(&x)?;
        bad += values.iter().filter(|v| !v.is_finite()).count();
        if a.plot.is_some() {
            let finite = values.chunks(2).filter(|r| r.iter().all(|v| v.is_finite()));
            plotted.extend(finite.flatten());
        }
        let (rows_out, _, _) = with_context(values, header("x", dim), &given);
        out.rows(&rows_out)?;
        n += rows;
    }
    if let Some(want) = a.n.filter(|&want| a.context_file.is_some() && want != n) {
        let file = a.context_file.as_ref().map(|p| p.display().to_string());
        return Err(format!("--n {want} but {} has {n} rows", file.unwrap_or_default()).into());
    }
    if bad > 0 {
        eprintln!("warning: {bad} sample values are not finite");
    }
    out.commit()?;
    if let Some(p) = &a.plot {
        plot::scatter(p, &plotted, &picture_options(&a, n))?;
    }
    eprintln!("wrote {n} samples to {}", a.out.display());
    Ok(())
}

/// The title and range of a picture of `n` samples.
fn picture_options(a: &SampleArgs, n: usize) -> PlotOptions {
    let condition = match (&a.context, &a.context_file) {
        (Some(c), _) => format!("{n} samples, context {c}"),
        (None, Some(f)) => format!("{n} samples, contexts from {}", f.display()),
        (None, None) => format!("{n} samples"),
    };
    PlotOptions::new(plot::title(&a.model, Some(&condition)))
        .with_axes(&header("x", 2))
        .with_range(a.range)
}

/// The most images a PNG grid draws.
const MAX_GRID: usize = 1024;

/// An image model's samples: pixel values `⌊x·L⌋` of draws `x ∈ [0, 1)` (clamped to
/// `[0, L − 1]`), as CSV rows or, for a `.png` name, a grid.
fn images(a: &SampleArgs, model: &LoadedModel, image: ImageInfo) -> CmdResult {
    if a.context.is_some() || a.context_file.is_some() {
        return Err(
            "image models are unconditional: --context and --context-file do not apply".into(),
        );
    }
    if a.plot.is_some() {
        return Err(
            "--plot draws 2-D models; an image model draws a grid with --out FILE.png".into(),
        );
    }
    if a.range.is_some() {
        return Err("--range applies to 2-D pictures, not to an image model's grid".into());
    }
    let n = a.n.ok_or("--n is required")?;
    if n == 0 {
        return Err("--n must be at least 1".into());
    }
    let png = a
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if png && n > MAX_GRID {
        return Err(format!("--n {n}: a PNG grid holds at most {MAX_GRID} images").into());
    }
    let dim = image.shape.dim();
    let levels = image.pixel_levels as f32;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut out = if png {
        None
    } else {
        Some(CsvWriter::create(&a.out, &header("p", dim))?)
    };
    let (mut grid, mut bad) = (Vec::new(), 0usize);
    let mut left = n;
    while left > 0 {
        let rows = image_chunk_rows(dim).min(left);
        let x = model
            .flow
            .sample_with_context(rows, a.temperature, None, &mut rng)?;
        let pixels: Vec<f32> = host_values(&x)?
            .into_iter()
            .map(|v| {
                if v.is_finite() {
                    (v * levels).floor().clamp(0.0, levels - 1.0)
                } else {
                    bad += 1;
                    0.0
                }
            })
            .collect();
        match out.as_mut() {
            Some(out) => out.rows(&pixels)?,
            None => grid.extend(pixels),
        }
        left -= rows;
    }
    if bad > 0 {
        eprintln!("warning: {bad} sample values were not finite (drawn as 0)");
    }
    match out {
        Some(out) => out.commit()?,
        None => {
            let s = image.shape;
            plot::image_grid(
                &a.out,
                &grid,
                (s.channels, s.height, s.width),
                image.pixel_levels,
            )?
        }
    }
    eprintln!("wrote {n} images to {}", a.out.display());
    Ok(())
}
