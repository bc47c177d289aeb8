//! `flow train`'s model flags as the library's model options.

use flow_models::options::ModelOptions;

use crate::cli::TrainArgs;

/// The model options `a` gives.
pub(super) fn model_options(a: &TrainArgs) -> ModelOptions {
    ModelOptions {
        family: a.model.given.clone(),
        base: a.base.clone(),
        context_dim: a.context_dim,
        no_standardize: a.no_standardize,
        bounds: a.bounds.clone(),
        bounds_by: a.bounds_by.clone(),
        image: a.image.clone(),
        pixel_levels: a.pixel_levels,
    }
}
