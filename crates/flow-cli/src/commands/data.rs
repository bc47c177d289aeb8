use flow_train::data::{digits, generate, generate_labeled, Dataset};

use crate::{
    cli::{DataArgs, DataName, SplitArg},
    output::{check_writable, header, write_csv},
    CmdResult,
};

/// How many of the digits come first as the training split; the rest are the test
/// split.
pub const DIGITS_TRAIN: usize = 1500;

/// The rows of `split` of scikit-learn's digits.
pub fn digits_split(split: SplitArg) -> Dataset {
    let all = digits().data;
    let dim = all.dim;
    let rows = match split {
        SplitArg::Train => 0..DIGITS_TRAIN,
        SplitArg::Test => DIGITS_TRAIN..all.len(),
        SplitArg::All => 0..all.len(),
    };
    Dataset::new(dim, all.values[rows.start * dim..rows.end * dim].to_vec())
}

pub fn run(a: DataArgs) -> CmdResult {
    check_writable(&a.out)?;
    let toy = match a.name {
        DataName::Toy(toy) => toy,
        DataName::Digits => {
            if a.n.is_some() || a.with_labels || a.noise.is_some() {
                return Err("digits take --split, not --n, --noise or --with-labels".into());
            }
            let d = digits_split(a.split);
            write_csv(&a.out, &header("p", d.dim), &d.values)?;
            eprintln!("wrote {} images to {}", d.len(), a.out.display());
            return Ok(());
        }
    };
    if a.split != SplitArg::All {
        return Err("--split divides the digits; a generator draws --n fresh points".into());
    }
    let n = a.n.ok_or("--n is required")?;
    let (d, names) = if a.with_labels {
        let d = generate_labeled(toy, n, a.noise, a.seed)?;
        let mut names = header("x", d.dim - 1);
        names.push("label".into());
        (d, names)
    } else {
        let d = generate(toy, n, a.noise, a.seed)?;
        let names = header("x", d.dim);
        (d, names)
    };
    write_csv(&a.out, &names, &d.values)?;
    eprintln!("wrote {} points to {}", d.len(), a.out.display());
    Ok(())
}
