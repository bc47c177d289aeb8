//! The families of models the registry lists: the names recipes record and `--flow`
//! takes, each with its options, as its crate declares them
//! ([`ModelFamily`](flow_core::ModelFamily)).

use std::sync::Arc;

use flow_core::{AnyModelFamily, ModelData, OptionInfo};

use crate::ModelConfig;

/// A family of models, as a model's recipe names it.
#[derive(Clone)]
pub struct Family(Arc<dyn AnyModelFamily>);

impl PartialEq for Family {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Family {}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Family {
    pub(crate) fn new(family: Box<dyn AnyModelFamily>) -> Self {
        Self(Arc::from(family))
    }

    /// The family's name, as recipes record it.
    pub fn name(&self) -> &'static str {
        self.0.name()
    }

    /// One line on what the family is.
    pub fn summary(&self) -> &'static str {
        self.0.summary()
    }

    /// Whether the family models images (pixel data of a fixed shape).
    pub fn is_image(&self) -> bool {
        self.0.image()
    }

    /// Whether the family couples one part of a row to the rest, and so needs at
    /// least two features.
    pub fn couples(&self) -> bool {
        self.0.couples()
    }

    /// The decoupled weight decay the family's models train with unless told
    /// otherwise.
    pub fn weight_decay(&self) -> f64 {
        self.0.weight_decay()
    }

    /// The batch the family's models train with unless told otherwise (`None`: the
    /// trainer's).
    pub fn batch(&self) -> Option<usize> {
        self.0.batch()
    }

    /// The learning rate the family's conditional models train with unless told
    /// otherwise (`None`: the trainer's).
    pub fn conditional_lr(&self) -> Option<flow_core::ConditionalRate> {
        self.0.conditional_lr()
    }

    /// The options that spell the model a conditional run trains beside the family's
    /// own, where none of them is given (empty: none).
    pub fn conditional_rival(&self) -> &'static [(&'static str, &'static str)] {
        self.0.conditional_rival()
    }

    /// The rival model's options as flags: `--conditioner plain --hidden 128 …`.
    pub fn conditional_rival_flags(&self) -> String {
        let flags: Vec<String> = self
            .conditional_rival()
            .iter()
            .map(|(n, v)| format!("--{n} {v}"))
            .collect();
        flags.join(" ")
    }

    /// The family's options, in the order they apply, each with the family's default.
    pub fn options(&self) -> Vec<OptionInfo> {
        self.0.options()
    }

    /// Whether the family takes the option `name`.
    pub fn takes(&self, name: &str) -> bool {
        self.options().iter().any(|o| o.name == name)
    }

    /// The family's model of `data`, with the `given` options (`(name, value)`, the
    /// value as text) set over its defaults and checked; `seed` seeds a random choice
    /// (a random feature order). The message of a value out of bounds, or of an option
    /// the family does not take, is one line naming the option as `--name`.
    pub fn model(
        &self,
        data: &ModelData,
        given: &[(&str, &str)],
        seed: u64,
    ) -> Result<ModelConfig, String> {
        Ok(ModelConfig::from_spelled(self.0.spell(data, given, seed)?))
    }

    /// The first of the `given` options that, given alone, would change the recipe
    /// `model` records; the first given when the model records no recipe of this
    /// family. A value out of bounds is an error.
    pub fn first_change<'a>(
        &self,
        model: &ModelConfig,
        given: &[(&'a str, &str)],
        seed: u64,
    ) -> Result<Option<&'a str>, String> {
        let recipe = model.recipe.clone().unwrap_or_default();
        self.0.first_change(&recipe, given, seed)
    }
}
