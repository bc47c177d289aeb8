use flow_train::data::generate;

use crate::{
    cli::DataArgs,
    output::{check_writable, header, write_csv},
    CmdResult,
};

pub fn run(a: DataArgs) -> CmdResult {
    check_writable(&a.out)?;
    let d = generate(a.name, a.n, a.noise, a.seed)?;
    write_csv(&a.out, &header("x", d.dim), &d.values, d.dim)?;
    eprintln!("wrote {} points to {}", d.len(), a.out.display());
    Ok(())
}
