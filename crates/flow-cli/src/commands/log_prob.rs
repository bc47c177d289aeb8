use std::f64::consts::LN_2;

use candle::{Device, Tensor};
use flow_core::ImageInfo;
use flow_io::LoadedModel;
use flow_models::ModelDensity;
use flow_train::data::{check_pixels, load_images};

use crate::{
    cli::LogProbArgs,
    commands::{
        check_bounds, dequantized, device, host_values, image_chunk_rows, input_chunks, load_model,
        peak_memory_mib,
    },
    output::{check_distinct, check_writable, Format, RowWriter},
    print_out, CmdResult,
};

/// The header of a CSV file of log-probs.
const LOG_PROB_COLUMN: &str = "log_prob";

pub fn run(a: LogProbArgs) -> CmdResult {
    let format = match &a.out {
        Some(out) => Some(Format::of(out, "--out", &[Format::Csv, Format::Npy])?),
        None => None,
    };
    if let Some(out) = &a.out {
        check_writable(out)?;
        check_distinct(
            "--out",
            out,
            &[("--model", &a.model), ("--input", &a.input)],
        )?;
    }
    let device = device(&a.device)?;
    let model = load_model(&a.model, &device)?;
    let dim = model.flow.dim();
    dequantized::applies(a.dequantized, model.checkpoint.config.image_info())?;
    if a.seed.is_some() && model.checkpoint.config.image_info().is_none() {
        return Err(
            "--seed draws the dequantisation noise of an image model's pixels; this model is not an image model"
                .into(),
        );
    }
    if a.dequantized && a.seed.is_some() {
        return Err(
            "--seed draws the dequantisation noise of pixel values; --dequantized rows take none"
                .into(),
        );
    }
    let mut out = match (&a.out, format) {
        (Some(p), Some(format)) => Some(RowWriter::column(p, format, LOG_PROB_COLUMN)?),
        _ => None,
    };
    if let Some(image) = model.checkpoint.config.image_info() {
        let (rows, sum) = images(&a, &model, image, &device, out.as_mut())?;
        if let Some(out) = out {
            out.commit()?;
        }
        let noise = model.checkpoint.config.noise_std();
        if noise > 0.0 && !a.dequantized {
            print_out(&format!(
                "the likelihood of the noised data: pixels dequantised, then Gaussian noise of standard deviation {noise} added, as in training (not a bound on the pixels' probability)\n"
            ));
        }
        return report(rows, sum, dim);
    }
    let config = &model.checkpoint.config;
    let mut density = ModelDensity::new(config, &model.flow)?;
    let (mut rows, mut sum) = (0usize, 0f64);
    // Rows whose log-prob is not a number, and the first of them (1-based).
    let (mut nan_rows, mut first_nan) = (0usize, None);
    let what = a.input.display().to_string();
    for input in input_chunks(&a.input, dim, config.context_dim)? {
        let input = input?;
        check_bounds(config, &input.data, rows, &what)?;
        let x = input.x.to_device(&device)?;
        let context = input.context.map(|c| c.to_device(&device)).transpose()?;
        let lp = density.log_prob(&x, context.as_ref())?;
        let values = host_values(&lp.detach().unsqueeze(1)?)?;
        for (i, _) in values.iter().enumerate().filter(|(_, v)| v.is_nan()) {
            nan_rows += 1;
            first_nan.get_or_insert(rows + i + 1);
        }
        rows += values.len();
        sum += values.iter().map(|v| *v as f64).sum::<f64>();
        if let Some(out) = out.as_mut() {
            out.rows(&values)?;
        }
    }
    if let Some(out) = out {
        out.commit()?;
    }
    if let Some(note) = density.normalised_note() {
        eprintln!("{note}");
    }
    if let Some(first) = first_nan {
        eprintln!(
            "warning: {what}: {nan_rows} row(s), the first row {first}, have a NaN log-prob: the model's arithmetic overflows that far from its training data"
        );
    }
    report(rows, sum, dim)
}

/// Prints the mean log-prob of `rows` rows whose log-probs add up to `sum`.
fn report(rows: usize, sum: f64, dim: usize) -> CmdResult {
    let mean = sum / rows as f64;
    print_out(&format!(
        "{rows} rows  mean log-prob {mean:.4} nats  NLL {:.4} nats  {:.4} bits/dim\n",
        -mean,
        -mean / (dim as f64 * LN_2)
    ));
    if let Some(mib) = peak_memory_mib() {
        eprintln!("peak memory {mib:.0} MiB");
    }
    Ok(())
}

/// Chunk seeds per `--seed`: chunk `k` of seed `s` draws its noise from `s·CHUNK_SEEDS + k`,
/// so different seeds never share a chunk's noise.
const CHUNK_SEEDS: u64 = 1 << 32;

/// An image model on pixel values: each row dequantised once, `x = (pixel + u) / L`,
/// and scored on the pixels' discrete scale, `log p(x) − D·ln L` (a lower bound on
/// the pixels' log-probability in nats, whose negative mean over `D·ln 2` is bits per
/// dimension). With `--dequantized`, rows already in [0, 1) scored as they are,
/// `log p(x)`. Returns the rows and the sum of their scores.
fn images(
    a: &LogProbArgs,
    model: &LoadedModel,
    image: ImageInfo,
    device: &Device,
    mut out: Option<&mut RowWriter>,
) -> Result<(usize, f64), crate::Failure> {
    let what = a.input.display().to_string();
    let loaded = load_images(&a.input)?;
    let shape = image.shape;
    if let Some(d) = loaded.dims {
        if (d.channels, d.height, d.width) != (shape.channels, shape.height, shape.width) {
            return Err(format!(
                "{what} holds {}x{}x{} images, the model takes {}x{}x{}",
                d.height, d.width, d.channels, shape.height, shape.width, shape.channels
            )
            .into());
        }
    }
    let data = loaded.data;
    if data.dim != shape.dim() {
        return Err(format!(
            "{what}: {} values per row, but the model takes {}x{}x{} images ({} values)",
            data.dim,
            shape.height,
            shape.width,
            shape.channels,
            shape.dim()
        )
        .into());
    }
    let discrete = if a.dequantized {
        dequantized::check_rows(&data.values, data.dim, 0, &what)?;
        0.0
    } else {
        check_pixels(&data, image.pixel_levels, &what)?;
        shape.dim() as f64 * f64::from(image.pixel_levels).ln()
    };
    let seed = a.seed.unwrap_or(0);
    let (mut rows, mut sum) = (0usize, 0f64);
    for (k, chunk) in data
        .values
        .chunks(image_chunk_rows(data.dim) * data.dim)
        .enumerate()
    {
        let n = chunk.len() / data.dim;
        let rows_in = Tensor::from_slice(chunk, (n, data.dim), &Device::Cpu)?;
        let x = if a.dequantized {
            rows_in
        } else {
            flow_train::dequantize(
                &rows_in,
                image.pixel_levels,
                model.checkpoint.config.noise_std(),
                seed.wrapping_mul(CHUNK_SEEDS).wrapping_add(k as u64),
            )?
        };
        let lp = model.flow.log_prob(&x.to_device(device)?)?;
        let values: Vec<f32> = host_values(&lp.detach().unsqueeze(1)?)?
            .into_iter()
            .map(|v| (f64::from(v) - discrete) as f32)
            .collect();
        rows += values.len();
        sum += values.iter().map(|v| *v as f64).sum::<f64>();
        if let Some(out) = out.as_deref_mut() {
            out.rows(&values)?;
        }
    }
    if rows == 0 {
        return Err(format!("{what}: no rows").into());
    }
    Ok((rows, sum))
}
