use clap::ValueEnum;
use flow_train::data::{digits, generate, generate_labeled, Dataset, DIGITS_LEVELS};

use crate::{
    cli::{DataArgs, DataName, SplitArg},
    output::{check_rows, check_writable, header, write_rows, Format, MAX_GRID, MAX_SCATTER},
    plot, CmdResult,
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
    let format = Format::of(&a.out, "--out", &[Format::Csv, Format::Npy, Format::Png])?;
    check_writable(&a.out)?;
    let toy = match a.name {
        DataName::Toy(toy) => toy,
        DataName::Digits => {
            if a.n.is_some() || a.with_labels || a.noise.is_some() || a.seed.is_some() {
                return Err(
                    "digits take --split, not --n, --noise, --with-labels or --seed".into(),
                );
            }
            let d = digits_split(a.split);
            if format == Format::Png {
                if d.len() > MAX_GRID {
                    return Err(format!(
                        "a PNG grid holds at most {MAX_GRID} images; --split {} has {} (write .csv or .npy, or --split test)",
                        a.split.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
                        d.len()
                    )
                    .into());
                }
                plot::image_grid(&a.out, &d.values, (1, 8, 8), DIGITS_LEVELS)?;
            } else {
                write_rows(&a.out, format, &header("p", d.dim), &d.values)?;
            }
            eprintln!("wrote {} images to {}", d.len(), a.out.display());
            return Ok(());
        }
    };
    if a.split != SplitArg::All {
        return Err("--split divides the digits; a generator draws --n fresh points".into());
    }
    let n = check_rows(a.n.ok_or("--n is required")?)?;
    let seed = a.seed.unwrap_or(0);
    if format == Format::Png && n > MAX_SCATTER {
        return Err(format!("--n {n}: a PNG scatter draws at most {MAX_SCATTER} points").into());
    }
    let (d, names) = if a.with_labels {
        let d = generate_labeled(toy, n, a.noise, seed)?;
        let mut names = header("x", d.dim - 1);
        names.push("label".into());
        (d, names)
    } else {
        let d = generate(toy, n, a.noise, seed)?;
        let names = header("x", d.dim);
        (d, names)
    };
    if format == Format::Png {
        let points: Vec<f32> = d
            .values
            .chunks_exact(d.dim)
            .flat_map(|row| row[..2].iter().copied())
            .collect();
        let title = format!("{} — {} points, seed {}", toy.name(), d.len(), seed);
        plot::scatter(
            &a.out,
            &points,
            &plot::PlotOptions::new(title).with_axes(&names),
        )?;
    } else {
        write_rows(&a.out, format, &names, &d.values)?;
    }
    eprintln!("wrote {} points to {}", d.len(), a.out.display());
    Ok(())
}
