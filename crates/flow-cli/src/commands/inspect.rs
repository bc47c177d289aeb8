use crate::{cli::InspectArgs, CmdResult};

pub fn run(a: InspectArgs) -> CmdResult {
    let ck = flow_io::load(&a.model)?;
    // Rebuild to check that the tensors fit the configuration.
    let loaded = flow_io::build_checked(&a.model, ck, candle::DType::F32, &candle::Device::Cpu)?;
    let ck = &loaded.checkpoint;
    println!("model: {}", a.model.display());
    println!("features: {}", ck.config.dim);
    println!("layers: {}", ck.config.layers.len());
    println!("standardize: {}", ck.config.standardize);
    let params: usize = ck.tensors.values().map(|t| t.elem_count()).sum();
    println!("parameters: {params}");
    println!("config: {}", serde_json::to_string_pretty(&ck.config)?);
    if let Some(s) = &ck.summary {
        println!("training: {}", serde_json::to_string_pretty(s)?);
    }
    for (k, v) in &ck.extra {
        println!("{k}: {v}");
    }
    let mut names: Vec<_> = ck.tensors.iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    println!("tensors:");
    for (name, t) in names {
        println!("  {name:<40} {:?} {:?}", t.dtype(), t.dims());
    }
    Ok(())
}
