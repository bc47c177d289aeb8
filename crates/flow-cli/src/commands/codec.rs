use crate::{
    cli::CodecArgs,
    commands::{device, host_values, load_input, load_model},
    output::{check_writable, header, write_csv},
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
    let (_, input) = load_input(&a.input, dim)?;
    let input = input.to_device(&device)?;
    let (out, prefix) = match direction {
        Direction::Encode => (model.flow.encode(&input)?, "z"),
        Direction::Decode => (model.flow.decode(&input)?, "x"),
    };
    let values = host_values(&out.detach())?;
    write_csv(&a.out, &header(prefix, dim), &values, dim)?;
    eprintln!("wrote {} rows to {}", values.len() / dim, a.out.display());
    Ok(())
}
