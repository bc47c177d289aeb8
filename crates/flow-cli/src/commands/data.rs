use flow_train::data::{generate, Toy};

use crate::{
    cli::{DataArgs, ToyName},
    output::{check_writable, header, write_csv},
    CmdResult,
};

pub fn toy(name: ToyName) -> Toy {
    match name {
        ToyName::Moons => Toy::Moons,
        ToyName::Circles => Toy::Circles,
        ToyName::EightGaussians => Toy::EightGaussians,
        ToyName::Checkerboard => Toy::Checkerboard,
        ToyName::Spirals => Toy::Spirals,
        ToyName::Pinwheel => Toy::Pinwheel,
    }
}

pub fn run(a: DataArgs) -> CmdResult {
    check_writable(&a.out)?;
    let d = generate(toy(a.name), a.n, a.noise, a.seed)?;
    write_csv(&a.out, &header("x", d.dim), &d.values, d.dim)?;
    eprintln!("wrote {} points to {}", d.len(), a.out.display());
    Ok(())
}
