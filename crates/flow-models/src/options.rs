//! A model's options by name, as `flow train` and the Python package take them. The
//! families' own options are what their crates declare ([`Family::options`]); the
//! model's own settings (`base`, `context-dim`, `no-standardize`, `bounds`, `image`,
//! `pixel-levels`) apply by whether a family models images. Every face of the library
//! builds its models through here, so the defaults, checks and messages are the same
//! in each. Messages name an option as the command line spells it (`--hidden-layers`).

use flow_core::limits::{check_at_most, check_count, check_positive, MAX_COMPONENTS, MAX_DIM};
use flow_core::Bound;
pub use flow_core::{limits::positive_f32, ImageInfo, ImageShape, ModelData};
pub use flow_nn::Activation;

use crate::{BaseConfig, BoundsBy, Family, ModelConfig, Registry};

/// The options that set a model's own settings rather than a family's, each with
/// whether image families (rather than the others) take it.
pub const MODEL_SETTINGS: &[(&str, bool)] = &[
    ("base", false),
    ("context-dim", false),
    ("no-standardize", false),
    ("bounds", false),
    ("bounds-by", false),
    ("image", true),
    ("pixel-levels", true),
];

/// Which built-in families take which option: each family's options as its crate
/// declares them, then the model's own settings ([`MODEL_SETTINGS`]). The one table
/// that decides whether an option applies: an option given for a family not listed is
/// refused.
pub fn family_options() -> Vec<(&'static str, Vec<Family>)> {
    let registry = Registry::builtin();
    let mut table: Vec<(&'static str, Vec<Family>)> = registry
        .options()
        .into_iter()
        .map(|o| (o.name, o.families.into_iter().map(|(f, _)| f).collect()))
        .collect();
    for &(name, images) in MODEL_SETTINGS {
        let families = registry
            .model_families()
            .iter()
            .filter(|f| f.is_image() == images)
            .cloned()
            .collect();
        table.push((name, families));
    }
    table
}

/// The families that take the option `name` ([`family_options`]); every family for an
/// option the table does not list.
pub fn taking(name: &str) -> Vec<Family> {
    family_options()
        .into_iter()
        .find(|(option, _)| *option == name)
        .map_or_else(
            || Registry::builtin().model_families().to_vec(),
            |(_, families)| families,
        )
}

/// Whether `family` takes the option `name`.
pub fn takes(family: &Family, name: &str) -> bool {
    taking(name).contains(family)
}

/// The families that model rows of a single feature.
pub fn one_dimensional() -> Vec<Family> {
    Registry::builtin()
        .model_families()
        .iter()
        .filter(|f| !f.is_image() && !f.couples())
        .cloned()
        .collect()
}

/// `a, b and c`.
pub fn listed(families: &[Family]) -> String {
    let names: Vec<&str> = families.iter().map(|f| f.name()).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// Each family's default for the option `name`, with the families it is the default
/// of, as the families declare them (for help texts).
pub fn family_defaults(name: &str) -> Vec<(String, Vec<Family>)> {
    let mut defaults: Vec<(String, Vec<Family>)> = Vec::new();
    let options = Registry::builtin().options();
    let Some(option) = options.into_iter().find(|o| o.name == name) else {
        return defaults;
    };
    for (family, value) in option.families {
        match defaults.iter_mut().find(|(v, _)| *v == value) {
            Some((_, families)) => families.push(family),
            None => defaults.push((value, vec![family])),
        }
    }
    defaults
}

/// `--{name} v`, checked to lie in `[min, max]` before anything of that size is made.
pub fn count(name: &str, v: usize, min: usize, max: usize) -> Result<usize, String> {
    check_count(name, v, min, max)
}

/// `--{name} v`, checked to be positive and finite as the `f32` it becomes.
pub fn real(name: &str, v: f64) -> Result<f64, String> {
    check_positive(name, v)
}

/// The base distribution `--base` names: `normal`, `diag` or `mixture:K`.
pub fn base(text: &str) -> Result<BaseConfig, String> {
    match text.trim() {
        "normal" => Ok(BaseConfig::StandardNormal),
        "diag" => Ok(BaseConfig::DiagNormal { trainable: true }),
        other => match other.strip_prefix("mixture:").map(str::parse::<usize>) {
            Some(Ok(0)) => Err("--base mixture:K needs at least 1 component".into()),
            Some(Ok(k)) if k > MAX_COMPONENTS => Err(format!(
                "--base mixture:{k}: more components than the largest allowed, {MAX_COMPONENTS}"
            )),
            Some(Ok(k)) => Ok(BaseConfig::Mixture { components: k }),
            _ => Err(format!(
                "--base `{other}`: expected normal, diag or mixture:K"
            )),
        },
    }
}

/// One side of a `--bounds` entry: a number, or `-inf`/`inf` for an open side.
fn bound_side(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok()
}

/// `--bounds LOW:HIGH,…`: the box the data live in, one entry per data column of
/// the `dim` there are, each checked.
pub fn bounds(text: &str, dim: usize) -> Result<Vec<Bound>, String> {
    let entries: Vec<&str> = text.split(',').collect();
    if entries.len() != dim {
        return Err(format!(
            "--bounds gives {} entries for {dim} data columns: give one LOW:HIGH per column",
            entries.len()
        ));
    }
    entries
        .iter()
        .enumerate()
        .map(|(j, entry)| {
            let wrong = |why: &str| format!("--bounds entry {} `{}`: {why}", j + 1, entry.trim());
            let (low, high) = entry
                .split_once(':')
                .ok_or_else(|| wrong("expected LOW:HIGH, e.g. -1:1 or 0:inf"))?;
            let (Some(low), Some(high)) = (bound_side(low), bound_side(high)) else {
                return Err(wrong(
                    "expected two numbers, LOW:HIGH (-inf or inf for an open side)",
                ));
            };
            if low == f64::INFINITY || high == f64::NEG_INFINITY {
                return Err(wrong("the lower end must be below the upper end"));
            }
            let bound = Bound::new(
                (low != f64::NEG_INFINITY).then_some(low),
                (high != f64::INFINITY).then_some(high),
            );
            bound.validate().map_err(|e| wrong(&e))?;
            Ok(bound)
        })
        .collect()
}

/// `--image HxWxC`, its size computed without overflow and bounded.
pub fn image(text: &str) -> Result<ImageShape, String> {
    let expected = || format!("--image `{text}`: expected HxWxC, e.g. 28x28x1");
    let parts: Vec<usize> = text
        .split(['x', 'X'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| expected())?;
    let [h, w, c] = parts[..] else {
        return Err(expected());
    };
    if h == 0 || w == 0 || c == 0 {
        return Err(format!(
            "--image `{text}`: expected HxWxC with each at least 1, e.g. 28x28x1"
        ));
    }
    match h.checked_mul(w).and_then(|p| p.checked_mul(c)) {
        Some(d) if d <= MAX_DIM => Ok(ImageShape::new(c, h, w)),
        _ => Err(format!(
            "--image `{text}`: more values per image than the largest allowed, {MAX_DIM}"
        )),
    }
}

/// Looks up `text` among `values` by `name`, or says which values the option takes.
pub fn choice<T: Copy>(
    option: &str,
    text: &str,
    values: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T, String> {
    values
        .iter()
        .copied()
        .find(|v| name(*v) == text)
        .ok_or_else(|| {
            let names: Vec<&str> = values.iter().map(|v| name(*v)).collect();
            format!(
                "invalid value '{text}' for '--{option}' [possible values: {}]",
                names.join(", ")
            )
        })
}

/// The family `name` names, or the list of those there are.
pub fn family(name: &str) -> Result<Family, String> {
    let registry = Registry::builtin();
    registry.model_family(name).ok_or_else(|| {
        let names: Vec<&str> = registry.model_families().iter().map(|f| f.name()).collect();
        format!(
            "invalid value '{name}' for '--flow' [possible values: {}]",
            names.join(", ")
        )
    })
}

/// The options given for a model, each unless given `None` (or `false`): the families'
/// declarations hold the defaults, and an option only overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOptions {
    /// The families' options given, `(name, value)` with the value as text, in the
    /// order given ([`set`](Self::set)).
    pub family: Vec<(&'static str, String)>,
    pub base: Option<String>,
    pub context_dim: Option<usize>,
    pub no_standardize: bool,
    /// `LOW:HIGH,…`, one entry per data column ([`bounds`]).
    pub bounds: Option<String>,
    /// How the bounds hold: `logit` or `rejection` ([`BoundsBy`]); only with `bounds`.
    pub bounds_by: Option<String>,
    pub image: Option<String>,
    pub pixel_levels: Option<u32>,
}

impl ModelOptions {
    /// Gives the family option `name` the value `text`; an option no family declares
    /// is refused, naming those there are.
    pub fn set(&mut self, name: &str, text: impl Into<String>) -> Result<(), String> {
        let options = Registry::builtin().options();
        let Some(option) = options.iter().find(|o| o.name == name) else {
            let names: Vec<&str> = options.iter().map(|o| o.name).collect();
            return Err(format!(
                "unknown option `{name}`: the families' options are {}",
                names.join(", ")
            ));
        };
        self.family.retain(|(n, _)| *n != option.name);
        self.family.push((option.name, text.into()));
        Ok(())
    }

    /// The family options given, as the registry takes them.
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        self.family.iter().map(|(n, v)| (*n, v.as_str())).collect()
    }

    /// The options given, by their names: the families', then the model's own.
    pub fn given(&self) -> Vec<&'static str> {
        let own = [
            ("base", self.base.is_some()),
            ("context-dim", self.context_dim.is_some()),
            ("no-standardize", self.no_standardize),
            ("bounds", self.bounds.is_some()),
            ("bounds-by", self.bounds_by.is_some()),
            ("image", self.image.is_some()),
            ("pixel-levels", self.pixel_levels.is_some()),
        ];
        self.family
            .iter()
            .map(|(name, _)| *name)
            .chain(
                own.into_iter()
                    .filter_map(|(name, given)| given.then_some(name)),
            )
            .collect()
    }

    /// Refuses the options `flow` does not take, naming the families that do.
    pub fn check_apply(&self, flow: &Family) -> Result<(), String> {
        match self.given().into_iter().find(|o| !takes(flow, o)) {
            Some(option) => Err(format!(
                "--{option} applies to {}, not {}",
                listed(&taking(option)),
                flow.name()
            )),
            None => Ok(()),
        }
    }

    /// The options of the model a conditional run of `flow` trains beside the one
    /// these options describe, to keep whichever validates better
    /// ([`Family::conditional_rival`]): these with the rival's options set, where
    /// the data have a context and none of the rival's options is given.
    pub fn rival(&self, flow: &Family, context_dim: usize) -> Option<ModelOptions> {
        let rival = flow.conditional_rival();
        let given = |name: &str| self.family.iter().any(|(n, _)| *n == name);
        if context_dim == 0 || rival.is_empty() || rival.iter().any(|(n, _)| given(n)) {
            return None;
        }
        let mut options = self.clone();
        options
            .family
            .extend(rival.iter().map(|&(n, v)| (n, v.to_string())));
        Some(options)
    }

    /// The model these options describe for `flow` over `dim` features and
    /// `context_dim` context features (an image family: over `image`), every value
    /// the family's default unless an option gives it, checked, with standardisation
    /// of the data and any context for any but an image family unless
    /// `no_standardize`, confined to the box `bounds` gives, if any. `what` names the data in
    /// the messages. `seed` seeds a random `--order`.
    pub fn model(
        &self,
        flow: &Family,
        what: &str,
        dim: usize,
        context_dim: usize,
        image: Option<ImageInfo>,
        seed: u64,
    ) -> Result<ModelConfig, String> {
        // Bounded before the family lays out anything per feature.
        check_at_most("features", dim, MAX_DIM)?;
        check_at_most("context features", context_dim, MAX_DIM)?;
        if flow.couples() && dim < 2 {
            return Err(format!(
                "--flow {} couples one part of each row to the other and needs at least 2 features, but {what} has {dim}: in one dimension use {}",
                flow.name(),
                listed(&one_dimensional()).replacen(" and ", " or ", 1)
            ));
        }
        let data = ModelData::new(dim)
            .with_context_dim(context_dim)
            .with_image(image);
        let mut model = flow.model(&data, &self.pairs(), seed)?;
        if let Some(b) = &self.base {
            model = model.with_base(base(b)?);
        }
        if let Some(b) = &self.bounds {
            model = model.with_bounds(bounds(b, dim)?);
        }
        if let Some(by) = &self.bounds_by {
            if self.bounds.is_none() {
                return Err("--bounds-by says how --bounds hold: give --bounds too".into());
            }
            model = model.with_bounds_by(BoundsBy::parse(by)?);
        }
        let standardize = image.is_none() && !self.no_standardize;
        Ok(model
            .with_standardize(standardize)
            .with_standardize_context(standardize && context_dim > 0))
    }

    /// The first of the family options given that would change the recipe `model`
    /// records (a resumed run's); any option given when the model records no family.
    pub fn first_change(&self, model: &ModelConfig, seed: u64) -> Result<Option<&str>, String> {
        let given = self.pairs();
        match model.family() {
            Some(flow) => flow.first_change(model, &given, seed),
            None => Ok(given.first().map(|(name, _)| *name)),
        }
    }
}

/// The weight decay a family trains with unless told otherwise (decoupled, with
/// Adam), as the family declares it.
pub fn default_weight_decay(flow: &Family) -> f64 {
    flow.weight_decay()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Family {
        family(name).expect(name)
    }

    #[test]
    fn the_option_table_follows_the_families_declarations() {
        let families = Registry::builtin().model_families().to_vec();
        let images: Vec<Family> = families.iter().filter(|f| f.is_image()).cloned().collect();
        let rows: Vec<Family> = families.iter().filter(|f| !f.is_image()).cloned().collect();
        assert_eq!(taking("image"), images);
        assert_eq!(taking("base"), rows);
        assert_eq!(listed(&one_dimensional()), "nsf-ar, maf and iaf");
        assert_eq!(listed(&taking("bins")), "nsf and nsf-ar");
        assert_eq!(listed(&taking("nets")), "realnvp and nice");
        assert!(takes(&named("realnvp-image"), "channels"));
        assert!(!takes(&named("nice"), "coupling"));
        // No two options share a name.
        let names: Vec<&str> = family_options().iter().map(|(n, _)| *n).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(default_weight_decay(&named("glow")), 0.1);
        assert_eq!(default_weight_decay(&named("maf")), 0.0);
    }

    #[cfg(feature = "nsf")]
    #[test]
    fn options_set_the_family_configuration_and_bad_ones_are_named() -> Result<(), String> {
        let mut options = ModelOptions::default();
        options.set("layers", "3")?;
        options.set("hidden", "16")?;
        options.set("bins", "4")?;
        let model = options.model(&named("nsf"), "data", 3, 1, None, 0)?;
        // A conditional model starts from the conditional defaults; the options
        // given override them, the others stand.
        let mut want = flow_nsf::NsfConfig::conditional(3, 1)
            .with_layers(3)
            .with_hidden(16);
        want.spline.bins = 4;
        let want = ModelConfig::from(want)
            .with_standardize(true)
            .with_standardize_context(true);
        assert_eq!(model, want);
        assert_eq!(
            options.check_apply(&named("realnvp")).unwrap_err(),
            "--bins applies to nsf and nsf-ar, not realnvp"
        );
        assert_eq!(
            options.set("colour", "3").unwrap_err(),
            "unknown option `colour`: the families' options are layers, hidden, hidden-layers, activation, nets, coupling, scale, clamp, bins, tail-bound, masks, mixing, conditioner, order, scales, depth, channels, patch, blocks, layers-per-block, width, heads, noise-std"
        );
        let mut zero = ModelOptions::default();
        zero.set("layers", "0")?;
        assert_eq!(
            zero.model(&named("realnvp"), "data", 2, 0, None, 0)
                .unwrap_err(),
            "--layers must be at least 1, got 0"
        );
        assert_eq!(
            ModelOptions::default()
                .model(&named("nsf"), "data.csv", 1, 0, None, 0)
                .unwrap_err(),
            "--flow nsf couples one part of each row to the other and needs at least 2 features, but data.csv has 1: in one dimension use nsf-ar, maf or iaf"
        );
        let mut narrow = ModelOptions::default();
        narrow.set("hidden", "2")?;
        assert_eq!(
            narrow
                .model(&named("maf"), "data", 3, 0, None, 0)
                .unwrap_err(),
            "--hidden 2: an autoregressive network over 3 features needs at least 3 hidden units"
        );
        let mut wide = ModelOptions::default();
        wide.set("scale", "wide")?;
        assert_eq!(
            wide.model(&named("maf"), "data", 3, 0, None, 0)
                .unwrap_err(),
            "invalid value 'wide' for '--scale' [possible values: soft-clamp, exp, tanh]"
        );
        assert_eq!(
            base("mixture:0").unwrap_err(),
            "--base mixture:K needs at least 1 component"
        );
        assert_eq!(
            family("flowplusplus").unwrap_err(),
            "invalid value 'flowplusplus' for '--flow' [possible values: realnvp, nice, nsf, nsf-ar, maf, iaf, glow, realnvp-image, tarflow]"
        );
        Ok(())
    }

    #[test]
    fn bounds_read_one_interval_per_column_and_refuse_the_rest() {
        let b = bounds("-1:1, 0:inf,-inf:2.5,-inf:inf", 4).expect("valid");
        assert_eq!(
            b,
            [
                Bound::new(Some(-1.0), Some(1.0)),
                Bound::new(Some(0.0), None),
                Bound::new(None, Some(2.5)),
                Bound::unbounded(),
            ]
        );
        let refused = |text: &str, dim: usize| bounds(text, dim).unwrap_err();
        assert_eq!(
            refused("-1:1", 2),
            "--bounds gives 1 entries for 2 data columns: give one LOW:HIGH per column"
        );
        assert_eq!(
            refused("-1:1,1:0", 2),
            "--bounds entry 2 `1:0`: the lower bound 1 is not below the upper bound 0 in f32"
        );
        assert_eq!(
            refused("2:2", 1),
            "--bounds entry 1 `2:2`: the lower bound 2 is not below the upper bound 2 in f32"
        );
        assert_eq!(
            refused("1:1.00000001", 1),
            "--bounds entry 1 `1:1.00000001`: the lower bound 1 is not below the upper bound 1.00000001 in f32"
        );
        assert_eq!(
            refused("nan:1", 1),
            "--bounds entry 1 `nan:1`: a bound must be finite in f32 (below 3.4028235e38 in size), got NaN"
        );
        assert_eq!(
            refused("-1e39:0", 1),
            "--bounds entry 1 `-1e39:0`: a bound must be finite in f32 (below 3.4028235e38 in size), got -1e39"
        );
        assert_eq!(
            refused("-3e38:3e38", 1),
            "--bounds entry 1 `-3e38:3e38`: the interval -3e38:3e38 is wider than f32 holds"
        );
        assert_eq!(
            refused("0:x", 1),
            "--bounds entry 1 `0:x`: expected two numbers, LOW:HIGH (-inf or inf for an open side)"
        );
        assert_eq!(
            refused("0", 1),
            "--bounds entry 1 `0`: expected LOW:HIGH, e.g. -1:1 or 0:inf"
        );
        assert_eq!(
            refused("inf:inf", 1),
            "--bounds entry 1 `inf:inf`: the lower end must be below the upper end"
        );
    }

    #[cfg(feature = "nsf")]
    #[test]
    fn a_conditional_model_standardises_its_context_and_keeps_its_box() -> Result<(), String> {
        let options = ModelOptions {
            bounds: Some("0:1,-inf:inf".into()),
            ..ModelOptions::default()
        };
        let model = options.model(&named("nsf"), "data", 2, 3, None, 0)?;
        assert!(model.standardize && model.standardize_context);
        assert_eq!(
            model.bounds,
            Some(vec![Bound::new(Some(0.0), Some(1.0)), Bound::unbounded()])
        );
        let plain = ModelOptions {
            no_standardize: true,
            ..ModelOptions::default()
        }
        .model(&named("nsf"), "data", 2, 3, None, 0)?;
        assert!(!plain.standardize && !plain.standardize_context);
        let unconditional = ModelOptions::default().model(&named("nsf"), "data", 2, 0, None, 0)?;
        assert!(unconditional.standardize && !unconditional.standardize_context);
        Ok(())
    }
}
