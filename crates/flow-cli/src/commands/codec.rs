use crate::{
    cli::CodecArgs,
    commands::{
        check_bounds, dequantized, device, host_values, input_chunks, load_model, peak_memory_mib,
        with_context,
    },
    output::{check_distinct, check_writable, header, Format, RowWriter},
    CmdResult,
};

#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// `z = f(x)`
    Encode,
    /// `x = f⁻¹(z)`
    Decode,
}

pub fn run(a: CodecArgs, direction: Direction) -> CmdResult {
    let format = Format::of(&a.out, "--out", &[Format::Csv, Format::Npy])?;
    check_writable(&a.out)?;
    check_distinct(
        "--out",
        &a.out,
        &[("--model", &a.model), ("--input", &a.input)],
    )?;
    let device = device(&a.device)?;
    let model = load_model(&a.model, &device)?;
    let dim = model.flow.dim();
    let config = &model.checkpoint.config;
    let context_dim = config.context_dim;
    // An image model's data side is always its continuous space [0, 1); the flag
    // checks that every value lies there.
    dequantized::applies(a.dequantized, config.image_info())?;
    let what = a.input.display().to_string();
    // Latents are the model's own coordinates, numbered; data columns keep their names.
    let mut names = match direction {
        Direction::Encode => header("z", dim),
        Direction::Decode => config.feature_names(),
    };
    names.extend(config.context_names());
    let mut out = RowWriter::create(&a.out, format, &names)?;
    let mut rows = 0;
    for input in input_chunks(&a.input, dim, context_dim)? {
        let input = input?;
        let x = input.x.to_device(&device)?;
        let context = input.context.map(|c| c.to_device(&device)).transpose()?;
        let c = context.as_ref();
        if a.dequantized && matches!(direction, Direction::Encode) {
            dequantized::check_rows(&input.data.values, dim, rows, &what)?;
        }
        if matches!(direction, Direction::Encode) {
            check_bounds(config, &input.data, rows, &what)?;
        }
        let y = match direction {
            Direction::Encode => model.flow.encode_with_context(&x, c)?,
            Direction::Decode => model.flow.decode_with_context(&x, c)?,
        };
        let y = host_values(&y.detach())?;
        if a.dequantized && matches!(direction, Direction::Decode) {
            if let Some((row, col, v)) = dequantized::outside(&y, dim) {
                return Err(format!(
                    "{what}: row {}: decodes to {v} in column {col}, outside [0, 1), the space --dequantized writes",
                    rows + row
                )
                .into());
            }
        }
        out.rows(&with_context(y, dim, &input.data))?;
        rows += input.data.len();
    }
    out.commit()?;
    eprintln!("wrote {rows} rows to {}", a.out.display());
    if let Some(mib) = peak_memory_mib() {
        eprintln!("peak memory {mib:.0} MiB");
    }
    Ok(())
}
