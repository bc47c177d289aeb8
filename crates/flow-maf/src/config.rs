use flow_nn::{Activation, Affine, AutoregressiveConfig, Order, ScaleMap};
use serde::{Deserialize, Serialize};

/// One MAF layer, fully specified (IAF: `inverted`); its JSON form names its kind,
/// `affine-autoregressive`, under `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum MafLayer {
    AffineAutoregressive(AutoregressiveConfig<Affine>),
}

/// A stack of MAF (or, `inverse`, IAF) layers. Defaults: 5 layers, MADE networks of two
/// hidden layers of 64 ReLU units (zuko's MAF), soft-clamped log-scales, orders that
/// alternate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MafConfig {
    pub dim: usize,
    pub layers: usize,
    pub hidden: usize,
    pub hidden_layers: usize,
    pub activation: Activation,
    pub scale: ScaleMap,
    pub order: Order,
    /// IAF: every layer used in the sampling direction.
    pub inverse: bool,
    pub context_dim: usize,
}

impl Default for MafConfig {
    fn default() -> Self {
        Self {
            dim: 2,
            layers: 5,
            hidden: 64,
            hidden_layers: 2,
            activation: Activation::Relu,
            scale: ScaleMap::default(),
            order: Order::Alternate,
            inverse: false,
            context_dim: 0,
        }
    }
}

impl MafConfig {
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
        with_scale: scale: ScaleMap,
        with_order: order: Order,
        with_inverse: inverse: bool,
        with_context_dim: context_dim: usize,
    }

    /// The stack spelled out layer by layer.
    pub fn layers(&self) -> Vec<MafLayer> {
        (0..self.layers)
            .map(|i| {
                MafLayer::AffineAutoregressive(AutoregressiveConfig {
                    order: self.order.of(i, self.dim),
                    hidden: vec![self.hidden; self.hidden_layers],
                    activation: self.activation,
                    transform: Affine::new(self.scale),
                    inverted: self.inverse,
                    context_dim: self.context_dim,
                    zero_init: false,
                    residual_blocks: 0,
                    stored_masks: false,
                })
            })
            .collect()
    }
}
