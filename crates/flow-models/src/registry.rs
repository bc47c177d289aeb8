use std::sync::{Arc, OnceLock};

use candle::Result;
use candle_nn::VarBuilder;
use flow_core::{Bijector, FixedLayers, LayerFamily, LayerSpec, OptionKind, SampleLayer};

use crate::{Family, ModelConfig};

/// The layer families a model configuration may use, looked up by layer kind, and the
/// families of models they make, looked up by name.
#[derive(Clone)]
pub struct Registry {
    families: Vec<Arc<dyn LayerFamily>>,
    models: Vec<Family>,
}

/// An option of the registry's families, with the families that take it.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryOption {
    pub name: &'static str,
    /// The help line of the first family that declares it.
    pub help: &'static str,
    pub kind: OptionKind,
    /// The families that take it, each with its default, in the registry's order.
    pub families: Vec<(Family, String)>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.kinds()).finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Registry {
    /// The families compiled in: the fixed layers (`permute`, `reverse`) and one line
    /// per family feature.
    pub fn builtin() -> Self {
        static BUILTIN: OnceLock<Registry> = OnceLock::new();
        BUILTIN.get_or_init(Self::compiled_in).clone()
    }

    fn compiled_in() -> Self {
        let registry = Self {
            families: vec![Arc::new(FixedLayers)],
            models: Vec::new(),
        };
        #[cfg(feature = "realnvp")]
        let registry = registry.with(flow_realnvp::RealNvpFamily);
        #[cfg(feature = "nsf")]
        let registry = registry.with(flow_nsf::NsfFamily);
        #[cfg(feature = "maf")]
        let registry = registry.with(flow_maf::MafFamily);
        #[cfg(feature = "glow")]
        let registry = registry.with(flow_glow::GlowFamily);
        registry
    }

    /// Adds a family with the families of models it makes
    /// ([`LayerFamily::models`]); its layer kinds and model names take precedence over
    /// earlier families' of the same name.
    pub fn with(mut self, family: impl LayerFamily + 'static) -> Self {
        for model in family.models() {
            let model = Family::new(model);
            match self.models.iter_mut().find(|m| m.name() == model.name()) {
                Some(earlier) => *earlier = model,
                None => self.models.push(model),
            }
        }
        self.families.insert(0, Arc::new(family));
        self
    }

    /// The families of models, in the order they joined.
    pub fn model_families(&self) -> &[Family] {
        &self.models
    }

    /// The family of models named `name`.
    pub fn model_family(&self, name: &str) -> Option<Family> {
        self.models.iter().find(|m| m.name() == name).cloned()
    }

    /// The family of models `model`'s recipe names, if it names a registered one.
    pub fn family_of(&self, model: &ModelConfig) -> Option<Family> {
        self.model_family(model.family_name()?)
    }

    /// Every option of the families of models, in the order the families declare
    /// them, each with the families that take it.
    pub fn options(&self) -> Vec<RegistryOption> {
        let mut options: Vec<RegistryOption> = Vec::new();
        for family in &self.models {
            for o in family.options() {
                let taker = (family.clone(), o.default);
                match options.iter_mut().find(|r| r.name == o.name) {
                    Some(r) => r.families.push(taker),
                    None => options.push(RegistryOption {
                        name: o.name,
                        help: o.help,
                        kind: o.kind,
                        families: vec![taker],
                    }),
                }
            }
        }
        options
    }

    /// Every layer kind it can build.
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds: Vec<&'static str> = self
            .families
            .iter()
            .flat_map(|f| f.kinds().iter().copied())
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }

    fn layer_family(&self, kind: &str) -> std::result::Result<&dyn LayerFamily, String> {
        self.families
            .iter()
            .find(|f| f.kinds().contains(&kind))
            .map(|f| f.as_ref())
            .ok_or_else(|| {
                format!(
                    "unknown layer type `{kind}`: this build knows {}",
                    self.kinds().join(", ")
                )
            })
    }

    /// Checks one layer against the model's features and context features.
    pub fn check(
        &self,
        spec: &LayerSpec,
        dim: usize,
        context_dim: usize,
    ) -> std::result::Result<(), String> {
        self.layer_family(spec.kind())?
            .check(spec, dim, context_dim)
    }

    /// A small layer of `kind`, from its family ([`LayerFamily::sample`]).
    pub fn sample(&self, kind: &str) -> Option<SampleLayer> {
        self.layer_family(kind).ok()?.sample(kind)
    }

    /// Builds one layer; its tensors live under `vb`.
    pub fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
        self.layer_family(spec.kind())
            .map_err(candle::Error::Msg)?
            .build(spec, vb)
    }
}
