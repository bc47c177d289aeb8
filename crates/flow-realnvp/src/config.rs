use serde::{Deserialize, Serialize};

use flow_nn::{
    Activation, Affine, ConditionerConfig, CouplingConfig, NetConfig, Nets, OutputLayout, ScaleMap,
    Shift,
};

/// One layer of a RealNVP or NICE stack, fully specified; its JSON form names its
/// kind under `type` (`affine` or `additive`), as a model configuration lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum CouplingLayer {
    Affine(CouplingConfig<Affine>),
    Additive(CouplingConfig<Shift>),
}

/// Which features the layers of a [`RealNvpConfig`] stack keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MaskPattern {
    /// Layer `i` keeps the first `⌊dim/2⌋` features and transforms the rest when `i`
    /// is even, and transforms that first part when `i` is odd.
    #[default]
    Halves,
    /// Layer `i` keeps the features whose index has the parity of `i`.
    Checkerboard,
}

/// Whether the stack uses affine (RealNVP) or additive (NICE) couplings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CouplingKind {
    #[default]
    Affine,
    Additive,
}

/// A RealNVP stack of coupling layers with alternating masks.
///
/// The defaults reproduce the reference job: 5 affine layers whose `s` and `t`
/// networks are `Linear(k, 512) → LeakyReLU → Linear(512, d − k)`, with the log-scale
/// soft-clamped at 3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RealNvpConfig {
    pub dim: usize,
    pub layers: usize,
    /// Width of each hidden layer.
    pub hidden: usize,
    /// Number of hidden layers of each network.
    pub hidden_layers: usize,
    pub activation: Activation,
    pub coupling: CouplingKind,
    pub scale: ScaleMap,
    pub mask: MaskPattern,
    pub nets: Nets,
    /// Start every layer as the identity (zero output layers).
    pub zero_init: bool,
    /// Features of a conditioning context (0: unconditional).
    pub context_dim: usize,
}

impl Default for RealNvpConfig {
    fn default() -> Self {
        Self {
            dim: 2,
            layers: 5,
            hidden: 512,
            hidden_layers: 1,
            activation: Activation::LeakyRelu,
            coupling: CouplingKind::Affine,
            scale: ScaleMap::default(),
            mask: MaskPattern::Halves,
            nets: Nets::Separate,
            zero_init: false,
            context_dim: 0,
        }
    }
}

impl RealNvpConfig {
    /// The reference configuration over `dim` features.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            ..Self::default()
        }
    }

    flow_core::with_setters! {
        with_layers: layers: usize,
        with_hidden: hidden: usize,
        with_hidden_layers: hidden_layers: usize,
        with_activation: activation: Activation,
        with_coupling: coupling: CouplingKind,
        with_scale: scale: ScaleMap,
        with_mask: mask: MaskPattern,
        with_nets: nets: Nets,
        with_zero_init: zero_init: bool,
        with_context_dim: context_dim: usize,
    }

    /// Checks the sizes; every other combination of settings is valid.
    pub fn validate(&self) -> Result<(), String> {
        if self.dim < 2 {
            return Err(format!(
                "a coupling flow needs at least 2 features, got {}",
                self.dim
            ));
        }
        for (name, v) in [("layers", self.layers), ("hidden", self.hidden)] {
            if v == 0 {
                return Err(format!("`{name}` must be at least 1"));
            }
        }
        Ok(())
    }

    /// The mask of layer `i`.
    pub fn mask_of(&self, i: usize) -> Vec<bool> {
        let d = self.dim;
        match self.mask {
            MaskPattern::Halves => (0..d).map(|j| (j < d / 2) == i.is_multiple_of(2)).collect(),
            MaskPattern::Checkerboard => (0..d).map(|j| j % 2 == i % 2).collect(),
        }
    }

    /// The stack spelled out layer by layer.
    pub fn layers(&self) -> Vec<CouplingLayer> {
        let conditioner = ConditionerConfig {
            nets: self.nets,
            layout: OutputLayout::ScaleShift,
            net: NetConfig::Mlp {
                hidden: vec![self.hidden; self.hidden_layers],
                activation: self.activation,
            },
            zero_init: self.zero_init,
        };
        (0..self.layers)
            .map(|i| {
                let (mask, conditioner) = (self.mask_of(i), conditioner.clone());
                let context_dim = self.context_dim;
                match self.coupling {
                    CouplingKind::Affine => CouplingLayer::Affine(CouplingConfig {
                        mask,
                        conditioner,
                        transform: Affine::new(self.scale),
                        inverted: false,
                        context_dim,
                    }),
                    CouplingKind::Additive => CouplingLayer::Additive(CouplingConfig {
                        mask,
                        conditioner,
                        transform: Shift {},
                        inverted: false,
                        context_dim,
                    }),
                }
            })
            .collect()
    }
}
