use std::fmt::Write as _;

use flow_io::Checkpoint;
use serde_json::{json, Map, Value};

use crate::{cli::InspectArgs, print_out, CmdResult};

pub fn run(a: InspectArgs) -> CmdResult {
    let ck = flow_io::load(&a.model)?;
    // Rebuild to check that the tensors fit the configuration.
    let loaded = flow_io::build_checked(&a.model, ck, candle::DType::F32, &candle::Device::Cpu)?;
    let ck = &loaded.checkpoint;
    let text = if a.json {
        format!("{}\n", serde_json::to_string_pretty(&everything(ck))?)
    } else {
        summary(&a.model.display().to_string(), ck)
    };
    print_out(&text);
    Ok(())
}

/// The family a model's recipe names; recipes written before families had names are
/// RealNVP descriptions.
fn family(ck: &Checkpoint) -> &str {
    match &ck.config.recipe {
        Some(r) => r
            .get("family")
            .and_then(|f| f.as_str())
            .unwrap_or("realnvp"),
        None => "layers given one by one",
    }
}

/// Whether a tensor is the model's, not the resumable training state's.
fn is_model_tensor(name: &str) -> bool {
    !name.starts_with(flow_io::STATE_PREFIX)
}

/// One screen: what the model is, how big, and how it was made.
fn summary(path: &str, ck: &Checkpoint) -> String {
    let cfg = &ck.config;
    let mut out = String::new();
    let _ = writeln!(out, "model: {path}");
    let _ = writeln!(out, "family: {}", family(ck));
    let _ = writeln!(out, "features: {}", cfg.dim);
    if cfg.context_dim > 0 {
        let _ = writeln!(out, "context features: {}", cfg.context_dim);
    }
    if let Some(image) = cfg.image_info() {
        let s = image.shape;
        let _ = writeln!(
            out,
            "images: {}x{}x{} (HxWxC), {} pixel levels",
            s.height, s.width, s.channels, image.pixel_levels
        );
    }
    let _ = writeln!(out, "layers: {}", layer_counts(ck));
    if let Some(recipe) = &cfg.recipe {
        let _ = writeln!(out, "settings: {}", settings(recipe));
    }
    let _ = writeln!(out, "base: {}", base(ck));
    let _ = writeln!(
        out,
        "standardized: {}",
        if cfg.standardize { "yes" } else { "no" }
    );
    if cfg.context_dim > 0 {
        let _ = writeln!(
            out,
            "context standardized: {}",
            if cfg.standardize_context { "yes" } else { "no" }
        );
    }
    if let Some(bounds) = &cfg.bounds {
        let names = cfg.feature_names();
        let parts: Vec<String> = bounds
            .iter()
            .zip(&names)
            .map(|(b, name)| format!("{name} {b}"))
            .collect();
        let _ = writeln!(
            out,
            "bounds: {} (held by {})",
            parts.join(", "),
            cfg.bounds_by.name()
        );
    }
    let (params, tensors) = ck
        .tensors
        .iter()
        .filter(|(name, _)| is_model_tensor(name))
        .fold((0, 0), |(p, n), (_, t)| (p + t.elem_count(), n + 1));
    let _ = writeln!(out, "parameters: {params} in {tensors} tensors");
    if let Some(s) = &ck.summary {
        let _ = writeln!(out, "training: {}", training(s));
    }
    if let Some(source) = ck.extra.get("imported_from") {
        let _ = writeln!(out, "imported from: {source}");
    }
    if ck.tensors.keys().any(|n| !is_model_tensor(n)) {
        let _ = writeln!(
            out,
            "resumable: yes (flow train --resume {path} continues the run)"
        );
    }
    let _ = writeln!(
        out,
        "(every setting and tensor: flow inspect --model {path} --json)"
    );
    out
}

/// `10 (5 affine, 5 reverse)`: the layers by kind, in order of first appearance.
fn layer_counts(ck: &Checkpoint) -> String {
    let mut kinds: Vec<(&str, usize)> = Vec::new();
    for layer in &ck.config.layers {
        match kinds.iter_mut().find(|(k, _)| *k == layer.kind()) {
            Some((_, n)) => *n += 1,
            None => kinds.push((layer.kind(), 1)),
        }
    }
    let parts: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    format!("{} ({})", ck.config.layers.len(), parts.join(", "))
}

/// The base distribution in words.
fn base(ck: &Checkpoint) -> String {
    use flow_models::BaseConfig;
    match ck.config.base {
        BaseConfig::StandardNormal => "standard normal".into(),
        BaseConfig::DiagNormal { trainable: true } => "trainable diagonal Gaussian".into(),
        BaseConfig::DiagNormal { trainable: false } => "diagonal Gaussian".into(),
        BaseConfig::Mixture { components } => {
            format!("trainable mixture of {components} diagonal Gaussians")
        }
    }
}

/// A recipe's settings on one line, `key value, …`, nested objects as `key.inner`;
/// what the lines above already say (family, features) is left out.
fn settings(recipe: &Value) -> String {
    fn flatten(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            Value::String(s) => out.push(format!("{prefix} {s}")),
            other => out.push(format!("{prefix} {other}")),
        }
    }
    let mut parts = Vec::new();
    if let Value::Object(m) = recipe {
        let shown: Map<String, Value> = m
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "family" | "dim" | "context_dim"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        flatten("", &Value::Object(shown), &mut parts);
    }
    parts.join(", ")
}

/// A training summary on one line.
fn training(s: &Value) -> String {
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    let mut parts = Vec::new();
    if let (Some(steps), Some(total)) = (num("steps"), num("total_steps")) {
        parts.push(format!("{steps} of {total} steps"));
    }
    if let Some(loss) = num("final_loss") {
        parts.push(format!("last batch NLL {loss:.4}"));
    }
    if let (Some(v), Some(at)) = (num("best_val_nll"), num("best_step")) {
        parts.push(format!(
            "best validation NLL {v:.4} (step {at}, the saved weights)"
        ));
    }
    if let Some(rate) = num("steps_per_sec") {
        parts.push(format!("{rate:.1} steps/s"));
    }
    if let Some(reason) = s.get("stopped").and_then(Value::as_str) {
        parts.push(format!("stopped: {reason}"));
    }
    for r in s
        .get("rivals")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let label = r.get("label").and_then(Value::as_str).unwrap_or("?");
        let score = r.get("best_val_nll").and_then(Value::as_f64);
        let score = score.map_or("no score".to_string(), |v| format!("{v:.4}"));
        parts.push(format!("kept over {label} (best validation NLL {score})"));
    }
    parts.join(", ")
}

/// The whole file as JSON: configuration, training summary, other metadata (as JSON
/// where it is JSON), and every tensor's dtype and shape.
fn everything(ck: &Checkpoint) -> Value {
    let metadata: Map<String, Value> = ck
        .extra
        .iter()
        .map(|(k, v)| {
            let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
            (k.clone(), v)
        })
        .collect();
    let mut names: Vec<&String> = ck.tensors.keys().collect();
    names.sort();
    let tensors: Map<String, Value> = names
        .into_iter()
        .map(|name| {
            let t = &ck.tensors[name];
            let info = json!({ "dtype": format!("{:?}", t.dtype()), "shape": t.dims() });
            (name.clone(), info)
        })
        .collect();
    json!({
        "config": ck.config,
        "training": ck.summary,
        "metadata": metadata,
        "tensors": tensors,
    })
}
