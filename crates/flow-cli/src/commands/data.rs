use flow_train::data::{generate, generate_labeled};

use crate::{
    cli::DataArgs,
    output::{check_writable, header, write_csv},
    CmdResult,
};

pub fn run(a: DataArgs) -> CmdResult {
    check_writable(&a.out)?;
    let (d, names) = if a.with_labels {
        let d = generate_labeled(a.name, a.n, a.noise, a.seed)?;
        let mut names = header("x", d.dim - 1);
        names.push("label".into());
        (d, names)
    } else {
        let d = generate(a.name, a.n, a.noise, a.seed)?;
        let names = header("x", d.dim);
        (d, names)
    };
    write_csv(&a.out, &names, &d.values)?;
    eprintln!("wrote {} points to {}", d.len(), a.out.display());
    Ok(())
}
