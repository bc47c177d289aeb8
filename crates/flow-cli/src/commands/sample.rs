use std::path::Path;

use flow_core::{limits::check_positive, ImageInfo};
use flow_io::LoadedModel;
use flow_models::ModelDensity;
use flow_train::data::{chunks, Dataset};
use rand::{rngs::StdRng, SeedableRng};

use crate::{
    cli::SampleArgs,
    commands::{
        device, host_values, image_chunk_rows, load_model, parse_context, with_context, CHUNK_ROWS,
    },
    output::{
        check_distinct, check_rows, check_writable, header, Format, RowWriter, MAX_GRID, MAX_ROWS,
        MAX_SCATTER,
    },
    plot::{self, PlotOptions},
    CmdResult, Failure,
};

/// The name of the column that tags each sample with its condition's row in
/// `--context-file` (with `--n`, several samples per row).
const ROW_COLUMN: &str = "row";

/// The most condition rows whose samples are tagged: row indices are written as f32,
/// which holds every whole number up to 2²⁴ exactly.
const MAX_TAGGED_ROWS: usize = 1 << 24;

/// A chunk of samples to draw: how many, their conditions, and (with `--context-file`
/// and `--n`) the condition row each comes from.
struct Draw {
    rows: usize,
    given: Dataset,
    tags: Option<Vec<f32>>,
}

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

/// Chunks of samples to draw.
type Draws<'a> = Box<dyn Iterator<Item = Result<Draw, Failure>> + 'a>;

/// The samples to draw, [`CHUNK_ROWS`] at a time, from the flags.
fn draws(a: &SampleArgs, context_dim: usize) -> Result<Draws<'_>, Failure> {
    let Some(path) = &a.context_file else {
        let n =
            a.n.ok_or("--n is required (or --context-file, one sample per row)")?;
        let host = candle::Device::Cpu;
        let row = match parse_context(a.context.as_deref(), context_dim, &host)? {
            Some(c) => c.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        let sizes = (0..n.div_ceil(CHUNK_ROWS)).map(move |i| CHUNK_ROWS.min(n - i * CHUNK_ROWS));
        return Ok(Box::new(sizes.map(move |rows| {
            let given = condition(rows, context_dim, row.repeat(rows));
            Ok(Draw {
                rows,
                given,
                tags: None,
            })
        })));
    };
    if context_dim == 0 {
        return Err("--context-file: the model is not conditional".into());
    }
    per_row(path, a.n, context_dim)
}

/// `per_row` samples (default 1) for every condition row of `path`, in order, in
/// chunks of at most [`CHUNK_ROWS`] samples; tagged with their row's index when
/// `per_row` is given.
fn per_row(path: &Path, per_row: Option<usize>, context_dim: usize) -> Result<Draws<'_>, Failure> {
    let tagged = per_row.is_some();
    let k = per_row.unwrap_or(1);
    let mut before = 0usize;
    let file = path.display();
    let rows = chunks(path, (CHUNK_ROWS / k).max(1))?.map(move |c| {
        let c = c?;
        if c.dim != context_dim {
            return Err(Failure::from(format!(
                "{file}: {} values per row, the model takes {context_dim} context features",
                c.dim
            )));
        }
        let first = before;
        before += c.len();
        let limit = if tagged {
            MAX_TAGGED_ROWS.min(MAX_ROWS / k)
        } else {
            MAX_ROWS
        };
        if before > limit {
            let what = match per_row {
                Some(k) => format!("--n {k} samples per row: at most {limit} rows"),
                None => format!("at most {MAX_ROWS} rows"),
            };
            return Err(format!("--context-file {file}: more than {limit} rows ({what})").into());
        }
        Ok((first, c.values))
    });
    let draws = rows.flat_map(
        move |chunk| -> Box<dyn Iterator<Item = Result<Draw, Failure>>> {
            let (first, context) = match chunk {
                Ok(c) => c,
                Err(e) => return Box::new(std::iter::once(Err(e))),
            };
            // Sample `s` of this chunk has condition row `s / k`.
            let samples = context.len() / context_dim * k;
            let pieces = (0..samples.div_ceil(CHUNK_ROWS)).map(move |p| {
                let range = p * CHUNK_ROWS..(samples.min((p + 1) * CHUNK_ROWS));
                let rows = range.len();
                let mut values = Vec::with_capacity(rows * context_dim);
                for s in range.clone() {
                    let r = s / k;
                    values.extend_from_slice(&context[r * context_dim..(r + 1) * context_dim]);
                }
                let tags = tagged.then(|| range.map(|s| (first + s / k) as f32).collect());
                Ok(Draw {
                    rows,
                    given: condition(rows, context_dim, values),
                    tags,
                })
            });
            Box::new(pieces)
        },
    );
    Ok(Box::new(draws))
}

/// `values` (`width` per row) with each row's tag in front.
fn tagged(values: Vec<f32>, width: usize, tags: &[f32]) -> Vec<f32> {
    values
        .chunks_exact(width)
        .zip(tags)
        .flat_map(|(row, tag)| std::iter::once(*tag).chain(row.iter().copied()))
        .collect()
}

pub fn run(a: SampleArgs) -> CmdResult {
    let format = Format::of(&a.out, "--out", &[Format::Csv, Format::Npy, Format::Png])?;
    check_writable(&a.out)?;
    let mut others = vec![("--model", a.model.as_path())];
    others.extend(a.context_file.as_deref().map(|c| ("--context-file", c)));
    check_distinct("--out", &a.out, &others)?;
    if let Some(p) = &a.plot {
        Format::of(p, "--plot", &[Format::Png])?;
        check_writable(p)?;
        others.push(("--out", &a.out));
        check_distinct("--plot", p, &others)?;
    }
    if let Some(n) = a.n {
        check_rows(n)?;
    }
    check_positive("temperature", a.temperature)?;
    let device = device(&a.device)?;
    let model = load_model(&a.model, &device)?;
    if let Some(image) = model.checkpoint.config.image_info() {
        return images(&a, &model, image, format);
    }
    let dim = model.flow.dim();
    let scatter = format == Format::Png || a.plot.is_some();
    if scatter && dim != 2 {
        return Err(format!(
            "a PNG scatter draws 2-D models; this one has {dim} features (write .csv or .npy)"
        )
        .into());
    }
    if a.range.is_some() && !scatter {
        return Err("--range applies to a picture: --plot FILE.png, or --out FILE.png".into());
    }
    if let Some(n) =
        a.n.filter(|&n| scatter && a.context_file.is_none() && n > MAX_SCATTER)
    {
        return Err(format!("--n {n}: a PNG scatter draws at most {MAX_SCATTER} points").into());
    }
    let config = &model.checkpoint.config;
    let context_dim = config.context_dim;
    let tagged_rows = a.context_file.is_some() && a.n.is_some();
    let mut names = Vec::new();
    if tagged_rows {
        names.push(ROW_COLUMN.to_string());
    }
    names.extend(config.feature_names());
    names.extend(config.context_names());
    let mut out = match format {
        Format::Png => None,
        _ => Some(RowWriter::create(&a.out, format, &names)?),
    };
    let density = ModelDensity::new(config, &model.flow)?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let (mut n, mut bad) = (0usize, 0usize);
    let mut plotted: Vec<f32> = Vec::new();
    for draw in draws(&a, context_dim)? {
        let Draw { rows, given, tags } = draw?;
        if scatter && n + rows > MAX_SCATTER {
            return Err(format!("a PNG scatter draws at most {MAX_SCATTER} points").into());
        }
        let context = given.context_tensor(&device)?;
        let x = density.sample(rows, a.temperature, context.as_ref(), &mut rng)?;
        let values = host_values(&x)?;
        bad += values.iter().filter(|v| !v.is_finite()).count();
        if scatter {
            let finite = values.chunks(2).filter(|r| r.iter().all(|v| v.is_finite()));
            plotted.extend(finite.flatten());
        }
        if let Some(out) = out.as_mut() {
            let values = with_context(values, dim, &given);
            match &tags {
                Some(tags) => out.rows(&tagged(values, dim + context_dim, tags))?,
                None => out.rows(&values)?,
            }
        }
        n += rows;
    }
    if bad > 0 {
        eprintln!("warning: {bad} sample values are not finite");
    }
    let picture = picture_options(&a, n, &config.feature_names());
    match out {
        Some(out) => out.commit()?,
        None => plot::scatter(&a.out, &plotted, &picture)?,
    }
    if let Some(p) = &a.plot {
        plot::scatter(p, &plotted, &picture)?;
    }
    eprintln!("wrote {n} samples to {}", a.out.display());
    Ok(())
}

/// The title and range of a picture of `n` samples.
fn picture_options(a: &SampleArgs, n: usize, axes: &[String]) -> PlotOptions {
    let condition = match (&a.context, &a.context_file) {
        (Some(c), _) => format!("{n} samples, context {c}"),
        (None, Some(f)) => format!("{n} samples, contexts from {}", f.display()),
        (None, None) => format!("{n} samples"),
    };
    PlotOptions::new(plot::title(&a.model, Some(&condition)))
        .with_axes(axes)
        .with_range(a.range)
}

/// An image model's samples: pixel values `⌊x·L⌋` of draws `x ∈ [0, 1)` (clamped to
/// `[0, L − 1]`), as rows (CSV or `.npy`) or a PNG grid.
fn images(a: &SampleArgs, model: &LoadedModel, image: ImageInfo, format: Format) -> CmdResult {
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
    let png = format == Format::Png;
    if png && n > MAX_GRID {
        return Err(format!("--n {n}: a PNG grid holds at most {MAX_GRID} images").into());
    }
    let dim = image.shape.dim();
    let levels = image.pixel_levels as f32;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut out = match format {
        Format::Png => None,
        _ => Some(RowWriter::create(&a.out, format, &header("p", dim))?),
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
