//! Layers described by data. A model configuration lists [`LayerSpec`]s; a
//! [`LayerFamily`] turns the specs of the kinds it knows into bijectors. Families are
//! gathered in a registry (the `flow-models` crate), so a new family plugs in without
//! touching the ones before it. A family crate's own part is small: its layer, a serde
//! enum that is a [`LayerConfig`], named with its kinds in a [`Family`].

use candle::Result;
use candle_nn::VarBuilder;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{AnyModelFamily, Bijector, Permute, Reverse};

/// The key of a spec that names its layer's kind.
const KIND: &str = "type";

/// One layer of a model configuration: a JSON object whose `type` names the layer's
/// kind, beside the kind's own settings, e.g.
/// `{"type": "reverse", "dim": 2}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Map<String, Value>", into = "Map<String, Value>")]
pub struct LayerSpec {
    kind: String,
    settings: Map<String, Value>,
}

impl LayerSpec {
    /// A layer of `kind` with `settings` (anything that serialises to a JSON object).
    pub fn new(kind: &str, settings: &impl Serialize) -> std::result::Result<Self, String> {
        match serde_json::to_value(settings).map_err(|e| e.to_string())? {
            Value::Object(settings) => Ok(Self {
                kind: kind.to_string(),
                settings,
            }),
            other => Err(format!(
                "settings of a `{kind}` layer must be an object, got {other}"
            )),
        }
    }

    /// A layer from a value that names its own kind under `type` (a serde enum tagged
    /// `type`, for example).
    pub fn tagged(value: &impl Serialize) -> std::result::Result<Self, String> {
        match serde_json::to_value(value).map_err(|e| e.to_string())? {
            Value::Object(map) => Self::try_from(map),
            other => Err(format!("a layer must be an object, got {other}")),
        }
    }

    /// Layers that name their own kinds (a serde enum tagged `type`), as specs.
    pub fn tagged_all<L: Serialize>(layers: &[L]) -> Vec<Self> {
        layers
            .iter()
            .map(|l| Self::tagged(l).expect("a layer tagged `type` serialises to an object"))
            .collect()
    }

    /// The layer's kind, its `type`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The whole spec, `type` included, read as `T` (a serde enum tagged `type`); the
    /// error names the kind.
    pub fn tagged_as<T: DeserializeOwned>(&self) -> std::result::Result<T, String> {
        serde_json::from_value(Value::Object(self.clone().into()))
            .map_err(|e| format!("`{}` layer: {e}", self.kind))
    }

    /// The settings read as `T`; the error names the kind.
    pub fn settings<T: DeserializeOwned>(&self) -> std::result::Result<T, String> {
        serde_json::from_value(Value::Object(self.settings.clone()))
            .map_err(|e| format!("`{}` layer: {e}", self.kind))
    }
}

impl TryFrom<Map<String, Value>> for LayerSpec {
    type Error = String;

    fn try_from(mut settings: Map<String, Value>) -> std::result::Result<Self, String> {
        match settings.remove(KIND) {
            Some(Value::String(kind)) => Ok(Self { kind, settings }),
            Some(other) => Err(format!("a layer's `{KIND}` must be a string, got {other}")),
            None => Err(format!("a layer needs a `{KIND}`")),
        }
    }
}

impl From<LayerSpec> for Map<String, Value> {
    fn from(spec: LayerSpec) -> Self {
        let mut map = Map::new();
        map.insert(KIND.into(), Value::String(spec.kind));
        map.extend(spec.settings);
        map
    }
}

/// Builds the layers of some kinds from their specs.
pub trait LayerFamily: Send + Sync {
    /// The `type`s it builds.
    fn kinds(&self) -> &[&'static str];

    /// Checks a spec against the model's features and context features, before any
    /// tensor is made; the message says what is wrong.
    fn check(
        &self,
        spec: &LayerSpec,
        dim: usize,
        context_dim: usize,
    ) -> std::result::Result<(), String>;

    /// Builds the layer, reading (or creating) its tensors under `vb`.
    fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> Result<Box<dyn Bijector>>;

    /// A small layer of `kind` for the checks every registered kind must pass (round
    /// trip, log-det, density, fused kernels, save and load). `None`, the default,
    /// fails those checks, so that no kind goes unchecked.
    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        let _ = kind;
        None
    }

    /// The families of whole models it makes ([`ModelFamily`](crate::ModelFamily)):
    /// the names `--flow` takes, their defaults and options. None, the default, for a
    /// family of layers alone.
    fn models(&self) -> Vec<Box<dyn AnyModelFamily>> {
        Vec::new()
    }
}

/// A small layer and the rows it takes: [`LayerFamily::sample`].
#[derive(Debug, Clone, PartialEq)]
pub struct SampleLayer {
    pub spec: LayerSpec,
    /// Features per row.
    pub dim: usize,
    /// The interval every feature lies in: the real line for most layers, `[0, 1)`
    /// for a logit.
    pub domain: (f64, f64),
}

impl SampleLayer {
    /// A layer over `dim` features on the real line.
    pub fn new(spec: LayerSpec, dim: usize) -> Self {
        Self {
            spec,
            dim,
            domain: (f64::NEG_INFINITY, f64::INFINITY),
        }
    }
}

/// One layer of a family as a model configuration holds it (a serde enum tagged
/// `type`, one variant per kind): checked against the model, then built.
pub trait LayerConfig {
    /// Checks the layer against the model's features and context features, before any
    /// tensor is made; the message says what is wrong.
    fn check(&self, dim: usize, context_dim: usize) -> std::result::Result<(), String>;

    /// Builds the layer, reading (or creating) its tensors under `vb`.
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Bijector>>;
}

/// A family whose specs read as one [`LayerConfig`]: all a family crate writes to be
/// a [`LayerFamily`] is its layer type and its kinds.
pub trait Family: Send + Sync {
    /// The family's layer, tagged `type` with one variant per kind.
    type Layer: LayerConfig + DeserializeOwned;

    /// The `type`s of the layer's variants.
    const KINDS: &'static [&'static str];

    /// A small layer of `kind` for the checks every registered kind must pass: see
    /// [`LayerFamily::sample`].
    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        let _ = kind;
        None
    }

    /// The families of whole models it makes: see [`LayerFamily::models`].
    fn models(&self) -> Vec<Box<dyn AnyModelFamily>> {
        Vec::new()
    }
}

impl<F: Family> LayerFamily for F {
    fn kinds(&self) -> &[&'static str] {
        F::KINDS
    }

    fn check(
        &self,
        spec: &LayerSpec,
        dim: usize,
        context_dim: usize,
    ) -> std::result::Result<(), String> {
        spec.tagged_as::<F::Layer>()?.check(dim, context_dim)
    }

    fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
        spec.tagged_as::<F::Layer>()
            .map_err(candle::Error::Msg)?
            .build(vb)
    }

    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        Family::sample(self, kind)
    }

    fn models(&self) -> Vec<Box<dyn AnyModelFamily>> {
        Family::models(self)
    }
}

/// The fixed layers: `permute` (`{"perm": [..]}`, `z[:, j] = x[:, perm[j]]`) and
/// `reverse` (`{"dim": d}`).
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedLayers;

#[derive(Deserialize)]
struct PermuteSettings {
    perm: Vec<usize>,
}

#[derive(Deserialize)]
struct ReverseSettings {
    dim: usize,
}

impl LayerFamily for FixedLayers {
    fn kinds(&self) -> &[&'static str] {
        &["permute", "reverse"]
    }

    fn check(&self, spec: &LayerSpec, dim: usize, _: usize) -> std::result::Result<(), String> {
        let n = match spec.kind() {
            "permute" => spec.settings::<PermuteSettings>()?.perm.len(),
            _ => spec.settings::<ReverseSettings>()?.dim,
        };
        if n != dim {
            return Err(format!(
                "{} of {n} features in a model of {dim}",
                spec.kind()
            ));
        }
        Ok(())
    }

    fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
        let dev = vb.device();
        Ok(match spec.kind() {
            "permute" => Box::new(Permute::new(
                spec.settings::<PermuteSettings>()
                    .map_err(candle::Error::Msg)?
                    .perm,
                dev,
            )?),
            _ => Box::new(Reverse::new(
                spec.settings::<ReverseSettings>()
                    .map_err(candle::Error::Msg)?
                    .dim,
                dev,
            )?),
        })
    }

    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        let spec = match kind {
            "permute" => LayerSpec::new(kind, &serde_json::json!({"perm": [1, 0]})),
            "reverse" => LayerSpec::new(kind, &serde_json::json!({"dim": 2})),
            _ => return None,
        };
        Some(SampleLayer::new(spec.ok()?, 2))
    }
}
