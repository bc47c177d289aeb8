use candle::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// Hidden-layer non-linearity of a conditioner network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    /// `max(x, 0.01·x)`: PyTorch's `LeakyReLU()` default slope.
    #[default]
    LeakyRelu,
    Relu,
    Tanh,
    /// The exact (erf) GELU.
    Gelu,
}

impl Activation {
    pub const LEAKY_SLOPE: f64 = 0.01;
    pub const ALL: [Activation; 4] = [Self::LeakyRelu, Self::Relu, Self::Tanh, Self::Gelu];

    /// The name used in configurations and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::LeakyRelu => "leaky-relu",
            Self::Relu => "relu",
            Self::Tanh => "tanh",
            Self::Gelu => "gelu",
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            // For a slope below 1, leaky-relu is the larger of x and slope·x.
            Self::LeakyRelu => x.maximum(&x.affine(Self::LEAKY_SLOPE, 0.0)?),
            Self::Relu => x.relu(),
            Self::Tanh => x.tanh(),
            Self::Gelu => x.gelu_erf(),
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "leaky-relu" | "leaky_relu" | "leakyrelu" => Ok(Self::LeakyRelu),
            "relu" => Ok(Self::Relu),
            "tanh" => Ok(Self::Tanh),
            "gelu" => Ok(Self::Gelu),
            _ => Err(format!(
                "unknown activation `{s}`: expected leaky-relu, relu, tanh or gelu"
            )),
        }
    }
}
