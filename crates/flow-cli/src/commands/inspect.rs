use std::fmt::Write as _;

use crate::{cli::InspectArgs, print_out, CmdResult};

pub fn run(a: InspectArgs) -> CmdResult {
    let ck = flow_io::load(&a.model)?;
    // Rebuild to check that the tensors fit the configuration.
    let loaded = flow_io::build_checked(&a.model, ck, candle::DType::F32, &candle::Device::Cpu)?;
    let ck = &loaded.checkpoint;
    let mut out = String::new();
    let _ = writeln!(out, "model: {}", a.model.display());
    // Recipes written before families had names are RealNVP descriptions.
    let family = match &ck.config.recipe {
        Some(r) => r
            .get("family")
            .and_then(|f| f.as_str())
            .unwrap_or("realnvp"),
        None => "(layers given one by one)",
    };
    let mut kinds: Vec<&str> = Vec::new();
    for layer in &ck.config.layers {
        if !kinds.contains(&layer.kind()) {
            kinds.push(layer.kind());
        }
    }
    let _ = writeln!(out, "family: {family}");
    let _ = writeln!(out, "features: {}", ck.config.dim);
    let _ = writeln!(out, "context features: {}", ck.config.context_dim);
    if let Some(image) = ck.config.image_info() {
        let s = image.shape;
        let _ = writeln!(
            out,
            "images: {}x{}x{} (HxWxC), {} pixel levels",
            s.height, s.width, s.channels, image.pixel_levels
        );
    }
    let _ = writeln!(
        out,
        "layers: {} ({})",
        ck.config.layers.len(),
        kinds.join(", ")
    );
    let _ = writeln!(out, "standardize: {}", ck.config.standardize);
    let params: usize = ck
        .tensors
        .iter()
        .filter(|(name, _)| !name.starts_with(flow_io::STATE_PREFIX))
        .map(|(_, t)| t.elem_count())
        .sum();
    let _ = writeln!(out, "parameters: {params}");
    let _ = writeln!(out, "config: {}", serde_json::to_string_pretty(&ck.config)?);
    if let Some(s) = &ck.summary {
        let _ = writeln!(out, "training: {}", serde_json::to_string_pretty(s)?);
    }
    for (k, v) in &ck.extra {
        let _ = writeln!(out, "{k}: {v}");
    }
    let mut names: Vec<_> = ck.tensors.iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    let _ = writeln!(out, "tensors:");
    for (name, t) in names {
        let _ = writeln!(out, "  {name:<40} {:?} {:?}", t.dtype(), t.dims());
    }
    print_out(&out);
    Ok(())
}
