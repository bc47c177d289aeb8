use candle_nn::VarBuilder;
use flow_core::{
    AnyModelFamily, Bijector, Choice, Family, LayerConfig, LayerSpec, ModelFamily, ModelOption,
    Recipe, SampleLayer,
};
use flow_nn::options;

use crate::{CouplingKind, CouplingLayer, RealNvpConfig};

/// The RealNVP and NICE layers of a model configuration: kinds `affine` and
/// `additive`, each a [`CouplingLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealNvpFamily;

impl Family for RealNvpFamily {
    type Layer = CouplingLayer;
    const KINDS: &'static [&'static str] = &["affine", "additive"];

    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        let coupling = match kind {
            "affine" => CouplingKind::Affine,
            "additive" => CouplingKind::Additive,
            _ => return None,
        };
        let cfg = RealNvpConfig::new(2)
            .with_layers(1)
            .with_hidden(8)
            .with_coupling(coupling)
            .with_zero_init(false);
        let spec = LayerSpec::tagged(cfg.layers().first()?).ok()?;
        Some(SampleLayer::new(spec, 2))
    }

    fn models(&self) -> Vec<Box<dyn AnyModelFamily>> {
        let realnvp = ModelFamily::new("realnvp", "Affine couplings", |d| {
            RealNvpConfig::new(d.dim).with_context_dim(d.context_dim)
        });
        let nice = ModelFamily::new("nice", "Additive couplings", |d| {
            RealNvpConfig::new(d.dim)
                .with_coupling(CouplingKind::Additive)
                .with_context_dim(d.context_dim)
        });
        let mut realnvp_options = shared_options();
        realnvp_options.push(coupling());
        realnvp_options.push(
            options::scale(|c: &RealNvpConfig| c.scale, |c, v| c.scale = v)
                .applying_when(|c| scaled("scale", c)),
        );
        realnvp_options.push(
            options::clamp(|c: &RealNvpConfig| c.scale, |c, v| c.scale = v)
                .applying_when(|c| scaled("clamp", c)),
        );
        vec![
            realnvp
                .with_couples(true)
                .with_options(realnvp_options)
                .boxed(),
            nice.with_couples(true)
                .with_options(shared_options())
                .boxed(),
        ]
    }
}

/// `--{flag}` shapes an affine coupling's scale: refused where `--coupling additive`
/// left none.
fn scaled(flag: &str, c: &RealNvpConfig) -> Result<(), String> {
    match c.coupling {
        CouplingKind::Affine => Ok(()),
        CouplingKind::Additive => Err(format!(
            "--{flag} shapes an affine coupling's scale; --coupling additive has none"
        )),
    }
}

/// The options RealNVP and NICE both take.
fn shared_options() -> Vec<ModelOption<RealNvpConfig>> {
    vec![
        options::layers(|c: &RealNvpConfig| c.layers, |c, v| c.layers = v),
        options::hidden(|c: &RealNvpConfig| c.hidden, |c, v| c.hidden = v),
        options::hidden_layers(
            |c: &RealNvpConfig| c.hidden_layers,
            |c, v| c.hidden_layers = v,
        ),
        options::activation(|c: &RealNvpConfig| c.activation, |c, v| c.activation = v),
        options::nets(|c: &RealNvpConfig| c.nets, |c, v| c.nets = v),
    ]
}

/// `--coupling`: RealNVP's affine coupling or NICE's additive one.
fn coupling() -> ModelOption<RealNvpConfig> {
    let choices = vec![
        Choice::new("affine", "RealNVP: scale and shift"),
        Choice::new("additive", "NICE: shift only (volume preserving)"),
    ];
    ModelOption::choice(
        "coupling",
        "Coupling layer: affine (RealNVP) or additive (NICE, as --flow nice)",
        choices,
        |c: &RealNvpConfig| match c.coupling {
            CouplingKind::Affine => "affine",
            CouplingKind::Additive => "additive",
        },
        |c, (name, _)| {
            c.coupling = match name {
                "additive" => CouplingKind::Additive,
                _ => CouplingKind::Affine,
            };
            Ok(())
        },
    )
}

impl Recipe for RealNvpConfig {
    fn family(&self) -> &'static str {
        match self.coupling {
            CouplingKind::Affine => "realnvp",
            CouplingKind::Additive => "nice",
        }
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn context_dim(&self) -> usize {
        self.context_dim
    }

    fn layer_specs(&self) -> Vec<LayerSpec> {
        LayerSpec::tagged_all(&self.layers())
    }
}

impl LayerConfig for CouplingLayer {
    fn check(&self, dim: usize, context_dim: usize) -> Result<(), String> {
        match self {
            Self::Affine(c) => c.check(dim, context_dim),
            Self::Additive(c) => c.check(dim, context_dim),
        }
    }

    fn build(&self, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        match self {
            Self::Affine(c) => c.build(vb),
            Self::Additive(c) => c.build(vb),
        }
    }
}
