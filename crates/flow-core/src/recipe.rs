//! Models described by a family's own terms. A family's [`Recipe`] (RealNVP's
//! configuration, say) spells out its layers; a [`ModelFamily`] names one family of
//! models, gives its defaults for the data, and declares the options that change them
//! ([`ModelOption`]), each once, next to the recipe it sets. The registry (the
//! `flow-models` crate) lists the families; the command line, the importers and the
//! trainer build models through it and restate none of this.

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

use crate::{limits, ImageInfo, LayerSpec};

/// A family's description of a whole model: the few settings a user chooses, from
/// which its layers follow.
pub trait Recipe: Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The name of the family of models it describes ([`ModelFamily::name`]); one
    /// recipe may describe several (RealNVP's, by its coupling, `realnvp` or `nice`).
    fn family(&self) -> &'static str;

    /// Features per row.
    fn dim(&self) -> usize;

    /// Context features of a conditional model.
    fn context_dim(&self) -> usize {
        0
    }

    /// The layers, as a model configuration lists them ([`LayerSpec::tagged_all`]).
    fn layer_specs(&self) -> Vec<LayerSpec>;

    /// Whether the model's base is a trainable diagonal Gaussian rather than `N(0, I)`.
    fn learned_base(&self) -> bool {
        false
    }

    /// Checks what the options set, once all are set; the message names the option at
    /// fault as its flag, `--name`.
    fn check_options(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What a family's defaults depend on: the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelData {
    /// Features per row.
    pub dim: usize,
    /// Context features per row (a conditional model).
    pub context_dim: usize,
    /// The images the rows are, for an image family.
    pub image: Option<ImageInfo>,
}

impl ModelData {
    /// Rows of `dim` features, no context, no images.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            context_dim: 0,
            image: None,
        }
    }

    crate::with_setters! {
        with_context_dim: context_dim: usize,
        with_image: image: Option<ImageInfo>,
    }
}

/// How an option reads a value of type `T` from a recipe `C`.
pub type Get<C, T> = Box<dyn Fn(&C) -> T + Send + Sync>;
/// How an option sets a value of type `T` in a recipe `C`, or says why it cannot.
pub type Set<C, T> = Box<dyn Fn(&mut C, T) -> Result<(), String> + Send + Sync>;

/// The values an option takes, and how it reads and sets them in a recipe `C`.
enum Setting<C> {
    /// A whole number in `[min, max]`.
    Count {
        min: usize,
        max: usize,
        get: Get<C, usize>,
        set: Set<C, usize>,
    },
    /// A positive number, finite as an `f32`.
    Positive { get: Get<C, f64>, set: Set<C, f64> },
    /// Zero (the setting off) or a positive number, finite as an `f32`.
    NonNegative { get: Get<C, f64>, set: Set<C, f64> },
    /// One of named choices; `set` takes the choice and a seed for a random one (a
    /// random order).
    Choice {
        choices: Vec<Choice>,
        get: Get<C, &'static str>,
        set: Set<C, (&'static str, u64)>,
    },
}

/// A value an option may take, with its help line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub name: &'static str,
    pub help: &'static str,
}

impl Choice {
    pub const fn new(name: &'static str, help: &'static str) -> Self {
        Self { name, help }
    }
}

/// One option of a family's models: its name (as the command line spells its flag,
/// `--name`), a help line, and how a value sets it.
pub struct ModelOption<C> {
    pub name: &'static str,
    pub help: &'static str,
    setting: Setting<C>,
    /// Whether the option applies to a recipe as the options before it left it (an
    /// error saying why not): a flag that does not apply is refused, not ignored.
    applies: Option<Applies<C>>,
}

type Applies<C> = Box<dyn Fn(&C) -> Result<(), String> + Send + Sync>;

impl<C> std::fmt::Debug for ModelOption<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelOption")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<C> ModelOption<C> {
    /// A whole-number option, bounded to `[min, max]` (a bound of
    /// [`limits`](crate::limits)).
    pub fn count(
        name: &'static str,
        help: &'static str,
        (min, max): (usize, usize),
        get: impl Fn(&C) -> usize + Send + Sync + 'static,
        set: impl Fn(&mut C, usize) + Send + Sync + 'static,
    ) -> Self {
        let set = move |c: &mut C, v| {
            set(c, v);
            Ok(())
        };
        let setting = Setting::Count {
            min,
            max,
            get: Box::new(get),
            set: Box::new(set),
        };
        Self {
            name,
            help,
            setting,
            applies: None,
        }
    }

    /// A positive real option.
    pub fn positive(
        name: &'static str,
        help: &'static str,
        get: impl Fn(&C) -> f64 + Send + Sync + 'static,
        set: impl Fn(&mut C, f64) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        let setting = Setting::Positive {
            get: Box::new(get),
            set: Box::new(set),
        };
        Self {
            name,
            help,
            setting,
            applies: None,
        }
    }

    /// A real option that zero turns off, otherwise positive.
    pub fn non_negative(
        name: &'static str,
        help: &'static str,
        get: impl Fn(&C) -> f64 + Send + Sync + 'static,
        set: impl Fn(&mut C, f64) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        let setting = Setting::NonNegative {
            get: Box::new(get),
            set: Box::new(set),
        };
        Self {
            name,
            help,
            setting,
            applies: None,
        }
    }

    /// An option that takes one of `choices`; `set` takes the choice and a seed for a
    /// random one.
    pub fn choice(
        name: &'static str,
        help: &'static str,
        choices: Vec<Choice>,
        get: impl Fn(&C) -> &'static str + Send + Sync + 'static,
        set: impl Fn(&mut C, (&'static str, u64)) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        let setting = Setting::Choice {
            choices,
            get: Box::new(get),
            set: Box::new(set),
        };
        Self {
            name,
            help,
            setting,
            applies: None,
        }
    }

    /// The option, refused with `applies`'s error where it does not apply to the
    /// recipe as the options before it left it.
    pub fn applying_when(
        self,
        applies: impl Fn(&C) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            applies: Some(Box::new(applies)),
            ..self
        }
    }

    /// What the option takes, without its recipe.
    fn kind(&self) -> OptionKind {
        match &self.setting {
            Setting::Count { min, max, .. } => OptionKind::Count {
                min: *min,
                max: *max,
            },
            Setting::Positive { .. } => OptionKind::Positive,
            Setting::NonNegative { .. } => OptionKind::NonNegative,
            Setting::Choice { choices, .. } => OptionKind::Choice(choices.clone()),
        }
    }

    /// The value `recipe` holds, as the option spells it.
    fn show(&self, recipe: &C) -> String {
        match &self.setting {
            Setting::Count { get, .. } => get(recipe).to_string(),
            Setting::Positive { get, .. } | Setting::NonNegative { get, .. } => {
                get(recipe).to_string()
            }
            Setting::Choice { get, .. } => get(recipe).to_string(),
        }
    }

    /// Sets `text` in `recipe`, read and bounded by the option's kind.
    fn set(&self, recipe: &mut C, text: &str, seed: u64) -> Result<(), String> {
        let name = self.name;
        if let Some(applies) = &self.applies {
            applies(recipe)?;
        }
        match &self.setting {
            Setting::Count { min, max, set, .. } => {
                let v: usize = text
                    .trim()
                    .parse()
                    .map_err(|_| format!("--{name} takes a whole number, got `{text}`"))?;
                set(recipe, limits::check_count(name, v, *min, *max)?)
            }
            Setting::Positive { set, .. } => {
                let v: f64 = text
                    .trim()
                    .parse()
                    .map_err(|_| format!("--{name} takes a number, got `{text}`"))?;
                set(recipe, limits::check_positive(name, v)?)
            }
            Setting::NonNegative { set, .. } => {
                let v: f64 = text
                    .trim()
                    .parse()
                    .map_err(|_| format!("--{name} takes a number, got `{text}`"))?;
                set(recipe, limits::check_non_negative(name, v)?)
            }
            Setting::Choice { choices, set, .. } => match choices.iter().find(|c| c.name == text) {
                Some(choice) => set(recipe, (choice.name, seed)),
                None => {
                    let names: Vec<&str> = choices.iter().map(|c| c.name).collect();
                    Err(format!(
                        "invalid value '{text}' for '--{name}' [possible values: {}]",
                        names.join(", ")
                    ))
                }
            },
        }
    }
}

/// What an option takes: [`Setting`] without the recipe.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionKind {
    Count { min: usize, max: usize },
    Positive,
    NonNegative,
    Choice(Vec<Choice>),
}

/// An option as the registry lists it: name, help, what it takes, and its default.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionInfo {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: OptionKind,
    /// The value of the family's defaults (over two features, or images of two
    /// pixels), as the option spells it.
    pub default: String,
}

/// One family of models: its name (as `--flow` and recipes give it), a line on what it
/// is, its defaults for the data, and its options.
pub struct ModelFamily<C> {
    pub name: &'static str,
    pub summary: &'static str,
    /// Whether it models images (rows of pixels of one shape).
    pub image: bool,
    /// Whether it couples one part of a row to the rest, and so needs two features.
    pub couples: bool,
    /// The decoupled weight decay its models train with unless told otherwise.
    pub weight_decay: f64,
    /// The batch its models train with unless told otherwise (`None`: the trainer's).
    pub batch: Option<usize>,
    /// The learning rate its conditional models (with a context) train with unless told
    /// otherwise (`None`: the trainer's).
    pub conditional_lr: Option<ConditionalRate>,
    /// Options, `(name, value)`, that spell a second model for conditional data: where
    /// none of them is given, it trains beside the family's own and whichever
    /// validates better is kept. Empty: the family's own alone.
    pub conditional_rival: &'static [(&'static str, &'static str)],
    /// The family's defaults for the data.
    pub defaults: fn(&ModelData) -> C,
    /// The options, in the order they apply (a bound's kind before the bound).
    pub options: Vec<ModelOption<C>>,
}

impl<C> std::fmt::Debug for ModelFamily<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFamily")
            .field("name", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<C: Recipe> ModelFamily<C> {
    pub fn new(name: &'static str, summary: &'static str, defaults: fn(&ModelData) -> C) -> Self {
        Self {
            name,
            summary,
            image: false,
            couples: false,
            weight_decay: 0.0,
            batch: None,
            conditional_lr: None,
            conditional_rival: &[],
            defaults,
            options: Vec::new(),
        }
    }

    crate::with_setters! {
        with_image: image: bool,
        with_couples: couples: bool,
        with_weight_decay: weight_decay: f64,
    }

    /// The family, training with batches of `batch` unless told otherwise.
    pub fn with_batch(self, batch: usize) -> Self {
        Self {
            batch: Some(batch),
            ..self
        }
    }

    /// The family, training its conditional models with the learning rate `lr` unless
    /// told otherwise.
    pub fn with_conditional_lr(self, lr: ConditionalRate) -> Self {
        Self {
            conditional_lr: Some(lr),
            ..self
        }
    }

    /// The family, training the model the `options` spell beside its own on
    /// conditional data, where none of them is given.
    pub fn with_conditional_rival(self, options: &'static [(&'static str, &'static str)]) -> Self {
        Self {
            conditional_rival: options,
            ..self
        }
    }

    /// The family with `options`.
    pub fn with_options(self, options: Vec<ModelOption<C>>) -> Self {
        Self { options, ..self }
    }

    /// The family behind a type-free face, as a registry holds it.
    pub fn boxed(self) -> Box<dyn AnyModelFamily> {
        Box::new(self)
    }

    /// `recipe` with the `given` options set, in the order the family declares them.
    fn apply(&self, mut recipe: C, given: &[(&str, &str)], seed: u64) -> Result<C, String> {
        for option in &self.options {
            for (_, value) in given.iter().filter(|(n, _)| *n == option.name) {
                option.set(&mut recipe, value, seed)?;
            }
        }
        Ok(recipe)
    }

    /// The first of `given` that the family does not take.
    fn foreign<'a>(&self, given: &[(&'a str, &str)]) -> Option<&'a str> {
        given
            .iter()
            .map(|(name, _)| *name)
            .find(|name| !self.options.iter().any(|o| o.name == *name))
    }
}

/// A learning rate that decays exponentially: `lr · decay^step` at optimizer step
/// `step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecayingRate {
    pub lr: f64,
    pub decay: f64,
}

/// The learning rate a family's conditional models train with, by the number of
/// training rows: `top` up to `rows_at_top` rows, then falling as `1/√rows`, never
/// below `floor`. More data are fitted more finely at a lower rate before they overfit;
/// little data overfit before a low rate has taken the model far. Its decay per step is
/// `1 − lr`, so that the rate summed over an unending run comes to 1, as the trainer's
/// default (1e-3 decaying by 0.999 a step) does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConditionalRate {
    pub top: f64,
    pub rows_at_top: usize,
    pub floor: f64,
}

impl ConditionalRate {
    /// The rate and its decay for `rows` training rows.
    pub fn at(&self, rows: usize) -> DecayingRate {
        let fall = (self.rows_at_top as f64 / rows.max(1) as f64).sqrt();
        let lr = (self.top * fall).clamp(self.floor, self.top);
        DecayingRate {
            lr,
            decay: 1.0 - lr,
        }
    }

    /// The rule in words, for a help line.
    pub fn describe(&self) -> String {
        format!(
            "{} up to {} training rows, then falling as 1/√rows to {}",
            self.top, self.rows_at_top, self.floor
        )
    }
}

/// A recipe spelled out: what a model configuration is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Spelled {
    /// The family it describes.
    pub family: &'static str,
    pub dim: usize,
    pub context_dim: usize,
    pub layers: Vec<LayerSpec>,
    pub learned_base: bool,
    /// The recipe as JSON, its family's name under `family`.
    pub recipe: Value,
}

impl Spelled {
    /// `recipe`, spelled out.
    pub fn new<C: Recipe>(recipe: &C) -> Self {
        let mut json = serde_json::to_value(recipe).unwrap_or_default();
        if let Value::Object(m) = &mut json {
            m.insert("family".into(), recipe.family().into());
        }
        Self {
            family: recipe.family(),
            dim: recipe.dim(),
            context_dim: recipe.context_dim(),
            layers: recipe.layer_specs(),
            learned_base: recipe.learned_base(),
            recipe: json,
        }
    }
}

/// A [`ModelFamily`] of any recipe type; options are given as `(name, value)` pairs of
/// text, and every message is one line naming the option as `--name`.
pub trait AnyModelFamily: Send + Sync {
    fn name(&self) -> &'static str;
    fn summary(&self) -> &'static str;
    fn image(&self) -> bool;
    fn couples(&self) -> bool;
    fn weight_decay(&self) -> f64;
    fn batch(&self) -> Option<usize>;
    fn conditional_lr(&self) -> Option<ConditionalRate>;
    fn conditional_rival(&self) -> &'static [(&'static str, &'static str)];
    /// The options, in the order the family declares them, with their defaults.
    fn options(&self) -> Vec<OptionInfo>;
    /// The family's model for `data` with the `given` options, checked; `seed` seeds
    /// a random choice.
    fn spell(&self, data: &ModelData, given: &[(&str, &str)], seed: u64)
        -> Result<Spelled, String>;
    /// The first of the `given` options that would change `recipe` (a model's recorded
    /// recipe), each given alone; the first given when `recipe` is not this family's.
    fn first_change<'a>(
        &self,
        recipe: &Value,
        given: &[(&'a str, &str)],
        seed: u64,
    ) -> Result<Option<&'a str>, String>;
}

impl<C: Recipe> AnyModelFamily for ModelFamily<C> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn summary(&self) -> &'static str {
        self.summary
    }

    fn image(&self) -> bool {
        self.image
    }

    fn couples(&self) -> bool {
        self.couples
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn batch(&self) -> Option<usize> {
        self.batch
    }

    fn conditional_lr(&self) -> Option<ConditionalRate> {
        self.conditional_lr
    }

    fn conditional_rival(&self) -> &'static [(&'static str, &'static str)] {
        self.conditional_rival
    }

    fn options(&self) -> Vec<OptionInfo> {
        let defaults = (self.defaults)(&ModelData::new(2));
        self.options
            .iter()
            .map(|o| OptionInfo {
                name: o.name,
                help: o.help,
                kind: o.kind(),
                default: o.show(&defaults),
            })
            .collect()
    }

    fn spell(
        &self,
        data: &ModelData,
        given: &[(&str, &str)],
        seed: u64,
    ) -> Result<Spelled, String> {
        if let Some(name) = self.foreign(given) {
            return Err(format!("--{name} does not apply to {}", self.name));
        }
        let recipe = self.apply((self.defaults)(data), given, seed)?;
        if recipe.context_dim() != data.context_dim {
            return Err(format!(
                "`{}` models take no context features, got {}",
                self.name, data.context_dim
            ));
        }
        recipe.check_options()?;
        Ok(Spelled::new(&recipe))
    }

    fn first_change<'a>(
        &self,
        recipe: &Value,
        given: &[(&'a str, &str)],
        seed: u64,
    ) -> Result<Option<&'a str>, String> {
        if let Some(name) = self.foreign(given) {
            return Err(format!("--{name} does not apply to {}", self.name));
        }
        let Ok(recorded) = serde_json::from_value::<C>(recipe.clone()) else {
            return Ok(given.first().map(|(name, _)| *name));
        };
        for option in &self.options {
            for &(name, value) in given.iter().filter(|(n, _)| *n == option.name) {
                let asked = self.apply(recorded.clone(), &[(name, value)], seed)?;
                if asked != recorded {
                    return Ok(Some(name));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conditional_rate_falls_as_one_over_root_rows_between_its_top_and_floor() {
        let rule = ConditionalRate {
            top: 1e-3,
            rows_at_top: 1_000,
            floor: 2e-4,
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        for rows in [0, 1, 500, 1_000] {
            assert!(close(rule.at(rows).lr, 1e-3), "{rows} rows");
        }
        // Nine times the rows: a third of the rate.
        assert!(close(rule.at(9_000).lr, 1e-3 / 3.0));
        assert!(close(rule.at(16_000).lr, 2.5e-4));
        assert!(close(rule.at(1_000_000).lr, 2e-4));
        for rows in [10, 4_000, 50_000] {
            let r = rule.at(rows);
            assert!(close(r.decay, 1.0 - r.lr), "{rows} rows: {r:?}");
        }
    }
}
