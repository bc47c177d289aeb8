use std::sync::Arc;

use candle::Result;
use candle_nn::VarBuilder;
use flow_core::{Bijector, FixedLayers, LayerFamily, LayerSpec, SampleLayer};

/// The layer families a model configuration may use, looked up by layer kind.
#[derive(Clone)]
pub struct Registry {
    families: Vec<Arc<dyn LayerFamily>>,
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
        let registry = Self {
            families: vec![Arc::new(FixedLayers)],
        };
        #[cfg(feature = "realnvp")]
        let registry = registry.with(flow_realnvp::RealNvpFamily);
        #[cfg(feature = "nsf")]
        let registry = registry.with(flow_nsf::NsfFamily);
        #[cfg(feature = "maf")]
        let registry = registry.with(flow_maf::MafFamily);
        #[cfg(feature = "glow")]
        let registry = registry.with(flow_glow::GlowFamily);
        #[cfg(feature = "tarflow")]
        let registry = registry.with(flow_tarflow::TarFlowFamily);
        registry
    }

    /// Adds a family; its kinds take precedence over earlier families' of the same
    /// name.
    pub fn with(mut self, family: impl LayerFamily + 'static) -> Self {
        self.families.insert(0, Arc::new(family));
        self
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

    fn family(&self, kind: &str) -> std::result::Result<&dyn LayerFamily, String> {
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
        self.family(spec.kind())?.check(spec, dim, context_dim)
    }

    /// A small layer of `kind`, from its family ([`LayerFamily::sample`]).
    pub fn sample(&self, kind: &str) -> Option<SampleLayer> {
        self.family(kind).ok()?.sample(kind)
    }

    /// Builds one layer; its tensors live under `vb`.
    pub fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
        self.family(spec.kind())
            .map_err(candle::Error::Msg)?
            .build(spec, vb)
    }
}
