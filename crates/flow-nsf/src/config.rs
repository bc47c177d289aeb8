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
pub const CONDITIONAL_HIDDEN: usize = 128;
/// The conditioners' hidden layers of [`NsfConfig::conditional`].
pub const CONDITIONAL_HIDDEN_LAYERS: usize = 2;

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
    /// estimation): as [`new`](Self::new), with conditioners of two hidden layers of
    /// 128 units. On the sbibm tasks of BENCHMARKS.md one layer of 512 overfits the
    /// 10-d Gaussian task within a few hundred steps (held-out NLL 0.65 nats at 10⁴
    /// simulations against 0.33), and two layers of 256 cost up to four times the
    /// training time of either and score worse there.
    pub fn conditional(dim: usize, context_dim: usize) -> Self {
        Self::new(dim)
            .with_context_dim(context_dim)
            .with_hidden(CONDITIONAL_HIDDEN)
            .with_hidden_layers(CONDITIONAL_HIDDEN_LAYERS)
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
                    net: NetConfig::Mlp {
                        hidden: hidden.to_vec(),
                        activation: self.activation,
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
    fn a_saved_configuration_without_masks_or_mixing_reads_as_before() {
        let old: NsfConfig =
            serde_json::from_str(r#"{"dim":4,"layers":3}"#).expect("an old configuration");
        assert_eq!((old.masks, old.mixing), (Masks::Halves, Mixing::None));
    }
}
