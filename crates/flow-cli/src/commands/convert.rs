use std::collections::BTreeMap;

use flow_io::{ImportOptions, Source};

use crate::{
    cli::{ImportArgs, SourceArg},
    output::{check_distinct, check_writable, Format},
    CmdResult,
};

pub fn import(a: ImportArgs) -> CmdResult {
    Format::of(&a.out, "--out", &[Format::Safetensors])?;
    check_writable(&a.out)?;
    check_distinct("--out", &a.out, &[("--input", &a.input)])?;
    if let Some(c) = a.clamp {
        if !(c.is_finite() && c > 0.0) {
            return Err(format!("--clamp must be positive, got {c}").into());
        }
    }
    let source = match a.from {
        SourceArg::Seed => Source::Seed,
        SourceArg::Normflows => Source::Normflows,
        SourceArg::Nflows => Source::Nflows,
        SourceArg::Zuko => Source::Zuko,
        SourceArg::Freia => Source::Freia,
    };
    let opts = ImportOptions {
        activation: a.activation,
        clamp: a.clamp,
        tail_bound: a.tail_bound,
    };
    // Built, checked and scored by the importer: nothing reaches `--out` that would
    // not load, and a failure names the input.
    let imported = flow_io::import(source, &a.input, &opts)?;
    for assumption in &imported.assumptions {
        eprintln!("{assumption}");
    }
    let mut extra = BTreeMap::new();
    extra.insert("imported_from".to_string(), source.name().to_string());
    flow_io::save(&a.out, &imported.config, &imported.tensors, None, &extra)?;
    eprintln!(
        "imported a {}-layer flow over {} features from {} weights into {}",
        imported.config.layers.len(),
        imported.config.dim,
        source.name(),
        a.out.display()
    );
    Ok(())
}
