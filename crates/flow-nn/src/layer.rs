//! What coupling and autoregressive layers share as a model configuration lists them:
//! the check of their context, and the one place a layer is turned around.

use flow_core::{Bijector, Inverse};

/// `layer` as a configuration asks for it: used in the opposite direction when
/// `inverted` (IAF, and layers other libraries define noise → data).
pub(crate) fn oriented(layer: impl Bijector + 'static, inverted: bool) -> Box<dyn Bijector> {
    if inverted {
        Box::new(Inverse(layer))
    } else {
        Box::new(layer)
    }
}

/// A layer of `layer` context features in a model of `model`.
pub(crate) fn check_context(layer: usize, model: usize) -> Result<(), String> {
    if layer != model {
        return Err(format!(
            "a layer of {layer} context features in a model of {model}"
        ));
    }
    Ok(())
}
