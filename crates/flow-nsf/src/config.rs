use flow_core::ConditionalRate;
use flow_nn::{
    Activation, AutoregressiveConfig, ConditionerConfig, CouplingConfig, LuLinearConfig, NetConfig,
    Nets, Order, OutputLayout, Spline,
};
use serde::{Deserialize, Serialize};

/// One layer of a spline flow, fully specified; its JSON form names its kind under
/// `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SplineLayer {
    /// NSF-C: a coupling whose transform is a spline.
    SplineCoupling(CouplingConfig<Spline>),
    /// NSF-AR: an autoregressive layer whose transform is a spline.
    SplineAutoregressive(AutoregressiveConfig<Spline>),
    /// A learned invertible linear map that mixes the features after a spline layer.
    LuLinear(LuLinearConfig),
}

/// The spline bins of [`NsfConfig::default`].
pub const DEFAULT_BINS: usize = 8;
/// The tail bound of [`NsfConfig::default`], in standard deviations of standardised data.
pub const DEFAULT_TAIL_BOUND: f64 = 3.0;

/// The conditioners' width of [`NsfConfig::conditional`].
pub const CONDITIONAL_HIDDEN: usize = 64;
/// The conditioners' residual blocks of [`NsfConfig::conditional`].
pub const CONDITIONAL_BLOCKS: usize = 2;
/// The learning rate a conditional NSF trains with unless told otherwise: the
/// trainer's 1e-3 (decaying by 0.999 a step) up to 1 000 training rows, 3.3e-4 at
/// 9 000 (decaying by 0.99967), never below 3e-4 (BENCHMARKS.md: at 10⁴ simulations
/// the 10-d Gaussian task's held-out NLL goes from 0.27–0.29 at 1e-3 to 0.20–0.21 at
/// 3e-4, while at 10³ the lower rate loses 0.03–0.3 nats on every task).
pub const CONDITIONAL_LR: ConditionalRate = ConditionalRate {
    top: 1e-3,
    rows_at_top: 1_000,
    floor: 3e-4,
};

/// The conditioners a conditional NSF also trains, beside its residual ones, keeping
/// whichever validates better (where `--conditioner`, `--hidden` and `--hidden-layers`
/// are not given): two plain ReLU layers of 128. Neither network is best on every
/// task of BENCHMARKS.md: at 10³ simulations the plain one fits the 10-d Gaussian
/// task's posterior, cut off by the prior's box, 0.29 nats better, and loses 0.2–0.3
/// nats on two moons and the Gaussian mixture; the validation score tells which.
pub const CONDITIONAL_RIVAL: &[(&str, &str)] = &[
    ("conditioner", "plain"),
    ("hidden", "128"),
    ("hidden-layers", "2"),
];

/// Which features each coupling layer transforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Masks {
    /// The second half of the features, then the first, in turn.
    #[default]
    Halves,
    /// The odd features, then the even ones, in turn.
    Alternate,
}

impl Masks {
    /// The mask of coupling layer `layer` over `dim` features: `true` for a kept one.
    pub fn of(self, layer: usize, dim: usize) -> Vec<bool> {
        let first = layer.is_multiple_of(2);
        (0..dim)
            .map(|j| match self {
                Self::Halves => (j < dim / 2) == first,
                Self::Alternate => j.is_multiple_of(2) == first,
            })
            .collect()
    }
}

/// What follows each spline layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mixing {
    /// Nothing: the masks or orders alone decide which features see which.
    #[default]
    None,
    /// An LU-parametrised linear layer ([`flow_nn::LuLinear`]), starting as the
    /// identity.
    Lu,
}

/// The shape of a coupling layer's conditioner networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// `hidden_layers` hidden layers, one after the other.
    #[default]
    Plain,
    /// An input layer, `hidden_layers` residual blocks (two layers with a skip
    /// connection around them), an output layer: nflows' `ResidualNet`, the network of
    /// sbi's NSF.
    Residual,
}

/// Coupling or autoregressive layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NsfKind {
    #[default]
    Coupling,
    Autoregressive,
}

/// A stack of spline layers. Defaults: 5 layers, one hidden layer of 512 ReLU units
/// (zuko's `NSF(hidden_features=(512,))` width), 8 bins on `[−3, 3]` (data
/// standardised, so the bins cover three standard deviations rather than being spent
/// where there is little data), conditioners whose last layer starts at zero (every
/// layer starts as the identity, which trains deep stacks more steadily), coupling
/// layers that alternate halves, or autoregressive layers that alternate orders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NsfConfig {
    pub dim: usize,
    pub kind: NsfKind,
    pub layers: usize,
    pub hidden: usize,
    pub hidden_layers: usize,
    pub activation: Activation,
    pub spline: Spline,
    /// The autoregressive layers' orders.
    pub order: Order,
    pub context_dim: usize,
    /// Start each conditioner's last layer at zero, so that each layer starts as the
    /// identity.
    pub zero_init: bool,
    /// The coupling layers' masks.
    pub masks: Masks,
    /// What follows each spline layer.
    pub mixing: Mixing,
    /// The coupling layers' conditioner networks.
    pub network: Network,
}

impl Default for NsfConfig {
    fn default() -> Self {
        Self {
            dim: 2,
            kind: NsfKind::Coupling,
            layers: 5,
            hidden: 512,
            hidden_layers: 1,
            activation: Activation::Relu,
            spline: Spline::new(DEFAULT_BINS, DEFAULT_TAIL_BOUND),
            order: Order::Alternate,
            context_dim: 0,
            zero_init: true,
            masks: Masks::Halves,
            mixing: Mixing::None,
            network: Network::Plain,
        }
    }
}

impl NsfConfig {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            ..Self::default()
        }
    }

    /// A stack for `dim` features given `context_dim` context features (posterior
    /// estimation): as [`new`](Self::new), with residual conditioners of two blocks of
    /// 64 units and an LU layer after each coupling (the shape of sbi's NSF). On the
    /// sbibm tasks of BENCHMARKS.md one plain layer of 512 overfits the 10-d Gaussian
    /// task within a few hundred steps (held-out NLL 0.65 nats at 10⁴ simulations),
    /// two plain layers of 128 reach 0.34, and this stack, trained at
    /// [`CONDITIONAL_LR`], 0.20, with two moons and the mixture as good or better.
    /// `flow train` trains [`CONDITIONAL_RIVAL`]'s network beside it where it can
    /// validate, and keeps the better.
    pub fn conditional(dim: usize, context_dim: usize) -> Self {
        Self::new(dim)
            .with_context_dim(context_dim)
            .with_hidden(CONDITIONAL_HIDDEN)
            .with_hidden_layers(CONDITIONAL_BLOCKS)
            .with_network(Network::Residual)
            .with_mixing(Mixing::Lu)
    }

    flow_core::with_setters! {
        with_kind: kind: NsfKind,
        with_layers: layers: usize,
        with_hidden: hidden: usize,
        with_hidden_layers: hidden_layers: usize,
        with_activation: activation: Activation,
        with_spline: spline: Spline,
        with_order: order: Order,
        with_context_dim: context_dim: usize,
        with_zero_init: zero_init: bool,
        with_masks: masks: Masks,
        with_mixing: mixing: Mixing,
        with_network: network: Network,
    }

    /// The stack spelled out layer by layer.
    pub fn layers(&self) -> Vec<SplineLayer> {
        let d = self.dim;
        let hidden = vec![self.hidden; self.hidden_layers];
        (0..self.layers)
            .flat_map(|i| {
                let spline = self.spline_layer(i, &hidden);
                let mixing = match self.mixing {
                    Mixing::None => None,
                    Mixing::Lu => Some(SplineLayer::LuLinear(LuLinearConfig::new(d))),
                };
                std::iter::once(spline).chain(mixing)
            })
            .collect()
    }

    /// Spline layer `i` of the stack.
    fn spline_layer(&self, i: usize, hidden: &[usize]) -> SplineLayer {
        let d = self.dim;
        match self.kind {
            NsfKind::Coupling => SplineLayer::SplineCoupling(CouplingConfig {
                mask: self.masks.of(i, d),
                conditioner: ConditionerConfig {
                    nets: Nets::Joint,
                    layout: OutputLayout::ByFeature,
                    net: match self.network {
                        Network::Plain => NetConfig::Mlp {
                            hidden: hidden.to_vec(),
                            activation: self.activation,
                        },
                        Network::Residual => NetConfig::Residual {
                            hidden: self.hidden,
                            blocks: self.hidden_layers,
                            activation: self.activation,
                        },
                    },
                    zero_init: self.zero_init,
                },
                transform: self.spline,
                inverted: false,
                context_dim: self.context_dim,
            }),
            NsfKind::Autoregressive => SplineLayer::SplineAutoregressive(AutoregressiveConfig {
                order: self.order.of(i, d),
                hidden: hidden.to_vec(),
                activation: self.activation,
                transform: self.spline,
                inverted: false,
                context_dim: self.context_dim,
                zero_init: self.zero_init,
                residual_blocks: 0,
                stored_masks: false,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_split_halves_or_alternate_and_swap_from_layer_to_layer() {
        assert_eq!(Masks::Halves.of(0, 5), [true, true, false, false, false]);
        assert_eq!(Masks::Halves.of(1, 5), [false, false, true, true, true]);
        assert_eq!(Masks::Alternate.of(0, 5), [true, false, true, false, true]);
        assert_eq!(Masks::Alternate.of(1, 5), [false, true, false, true, false]);
    }

    #[test]
    fn lu_mixing_follows_every_spline_layer() {
        let cfg = NsfConfig::new(3).with_layers(2).with_mixing(Mixing::Lu);
        let layers = cfg.layers();
        assert_eq!(layers.len(), 4);
        assert!(matches!(layers[0], SplineLayer::SplineCoupling(_)));
        assert_eq!(layers[1], SplineLayer::LuLinear(LuLinearConfig::new(3)));
        assert!(matches!(layers[2], SplineLayer::SplineCoupling(_)));
        assert_eq!(layers[3], SplineLayer::LuLinear(LuLinearConfig::new(3)));
        assert_eq!(NsfConfig::new(3).with_layers(2).layers().len(), 2);
    }

    #[test]
    fn a_saved_configuration_without_masks_mixing_or_network_reads_as_before() {
        let old: NsfConfig =
            serde_json::from_str(r#"{"dim":4,"layers":3}"#).expect("an old configuration");
        assert_eq!(
            (old.masks, old.mixing, old.network),
            (Masks::Halves, Mixing::None, Network::Plain)
        );
    }

    #[test]
    fn residual_conditioners_take_the_hidden_layers_as_blocks() {
        let net = |cfg: &NsfConfig| match &cfg.layers()[0] {
            SplineLayer::SplineCoupling(c) => c.conditioner.net.clone(),
            other => panic!("a coupling first, not {other:?}"),
        };
        let plain = NsfConfig::new(4).with_hidden(32).with_hidden_layers(3);
        let residual = plain.clone().with_network(Network::Residual);
        assert_eq!(
            net(&plain),
            NetConfig::Mlp {
                hidden: vec![32; 3],
                activation: Activation::Relu
            }
        );
        assert_eq!(
            net(&residual),
            NetConfig::Residual {
                hidden: 32,
                blocks: 3,
                activation: Activation::Relu
            }
        );
        // The conditional defaults: residual conditioners and an LU layer after each
        // coupling.
        let conditional = NsfConfig::conditional(4, 3);
        assert_eq!(conditional.layers().len(), 2 * conditional.layers);
        assert!(matches!(net(&conditional), NetConfig::Residual { .. }));
        // Autoregressive layers have no residual form here: refused, not ignored.
        let ar = NsfConfig::new(4)
            .with_kind(NsfKind::Autoregressive)
            .with_network(Network::Residual);
        let err = flow_core::Recipe::check_options(&ar).expect_err("refused");
        assert!(err.contains("--conditioner"), "{err}");
    }
}
