use crate::{
    cli::CodecArgs,
    commands::{
        dequantized, device, host_values, input_chunks, load_model, peak_memory_mib, with_context,
    },
    output::{check_writable, header, CsvWriter},
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
    check_writable(&a.out)?;
    let device = device(&a.device)?;
    let model = load_model(&a.model, &device)?;
    let dim = model.flow.dim();
    let context_dim = model.checkpoint.config.context_dim;
    // An image model's data side is always its continuous space [0, 1); the flag
    // checks that every value lies there.
    dequantized::applies(a.dequantized, model.checkpoint.config.image_info())?;
    let what = a.input.display().to_string();
    let prefix = match direction {
        Direction::Encode => "z",
        Direction::Decode => "x",
    };
    let mut names = header(prefix, dim);
    names.extend((0..context_dim).map(|j| format!("c{j}")));
    let mut out = CsvWriter::create(&a.out, &names)?;
    let mut rows = 0;
    for input in input_chunks(&a.input, dim, context_dim)? {
        let input = input?;
        let x = input.x.to_device(&device)?;
        let context = input.context.map(|c| c.to_device(&device)).transpose()?;
        let c = context.as_ref();
        if a.dequantized && matches!(direction, Direction::Encode) {
            dequantized::check_rows(&input.data.values, dim, rows, &what)?;
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
        let (values, _, _) = with_context(y, header(prefix, dim), &input.data);
        out.rows(&values)?;
        rows += input.data.len();
    }
    out.commit()?;
    eprintln!("wrote {rows} rows to {}", a.out.display());
    if let Some(mib) = peak_memory_mib() {
        eprintln!("peak memory {mib:.0} MiB");
    }
    Ok(())
}
