use crate::{
    cli::CodecArgs,
    commands::{device, host_values, load_input, load_model, with_context},
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
    let input = load_input(&a.input, dim, model.checkpoint.config.context_dim)?;
    let x = input.x.to_device(&device)?;
    let context = input.context.map(|c| c.to_device(&device)).transpose()?;
    let c = context.as_ref();
    let (out, prefix) = match direction {
        Direction::Encode => (model.flow.encode_with_context(&x, c)?, "z"),
        Direction::Decode => (model.flow.decode_with_context(&x, c)?, "x"),
    };
    let (values, names, width) = with_context(
        host_values(&out.detach())?,
        header(prefix, dim),
        &input.data,
    );
    write_csv(&a.out, &names, &values, width)?;
    eprintln!("wrote {} rows to {}", input.data.len(), a.out.display());
    Ok(())
}
