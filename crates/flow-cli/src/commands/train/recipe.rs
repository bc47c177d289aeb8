//! `flow train`'s model flags: whether the family takes them.

use flow_models::Family;

use crate::{
    cli::{listed, takes, taking, TrainArgs},
    Failure,
};

/// The model flags `a` gives: the families' options, then the model's own settings.
pub(super) fn given_model_flags(a: &TrainArgs) -> Vec<&'static str> {
    let own = [
        ("base", a.base.is_some()),
        ("context-dim", a.context_dim.is_some()),
        ("no-standardize", a.no_standardize),
        ("image", a.image.is_some()),
        ("pixel-levels", a.pixel_levels.is_some()),
    ];
    a.model
        .given
        .iter()
        .map(|(name, _)| *name)
        .chain(
            own.into_iter()
                .filter_map(|(flag, given)| given.then_some(flag)),
        )
        .collect()
}

/// Refuses the model flags `flow` does not take, naming the families that do.
pub(super) fn check_flags_apply(a: &TrainArgs, flow: &Family) -> Result<(), Failure> {
    match given_model_flags(a).into_iter().find(|f| !takes(flow, f)) {
        Some(flag) => Err(format!(
            "--{flag} applies to {}, not {}",
            listed(&taking(flag)),
            flow.name()
        )
        .into()),
        None => Ok(()),
    }
}
