use candle_nn::VarBuilder;
use flow_core::{
    limits::MAX_BINS, AnyModelFamily, Bijector, Choice, Family, LayerConfig, LayerSpec,
    ModelFamily, ModelOption, Recipe, SampleLayer,
};
use flow_nn::options;

use crate::{Masks, Mixing, Network, NsfConfig, NsfKind, Spline, SplineLayer};

/// The spline flows' layers of a model configuration: kinds `spline-coupling`,
/// `spline-autoregressive` and `lu-linear`, each a [`SplineLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct NsfFamily;

impl Family for NsfFamily {
    type Layer = SplineLayer;
    const KINDS: &'static [&'static str] =
        &["spline-coupling", "spline-autoregressive", "lu-linear"];

    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        let (nsf, position) = match kind {
            "spline-coupling" => (NsfKind::Coupling, 0),
            "spline-autoregressive" => (NsfKind::Autoregressive, 0),
            "lu-linear" => (NsfKind::Coupling, 1),
            _ => return None,
        };
        let cfg = NsfConfig::new(2)
            .with_kind(nsf)
            .with_layers(1)
            .with_hidden(8)
            .with_spline(Spline::new(4, 3.0))
            .with_zero_init(false)
            .with_mixing(Mixing::Lu);
        let spec = LayerSpec::tagged(cfg.layers().get(position)?).ok()?;
        Some(SampleLayer::new(spec, 2))
    }

    fn models(&self) -> Vec<Box<dyn AnyModelFamily>> {
        let nsf = ModelFamily::new(
            "nsf",
            "Rational-quadratic spline couplings (conditional: an LU layer after each coupling, and residual conditioners of two blocks of 64 or plain ones of two layers of 128, whichever validates better)",
            |d| match d.context_dim {
                0 => NsfConfig::new(d.dim),
                c => NsfConfig::conditional(d.dim, c),
            },
        );
        let nsf_ar = ModelFamily::new("nsf-ar", "Autoregressive rational-quadratic splines", |d| {
            NsfConfig::new(d.dim)
                .with_kind(NsfKind::Autoregressive)
                .with_context_dim(d.context_dim)
        });
        let mut ar_options = shared_options();
        ar_options.push(options::order(|c: &NsfConfig| c.order, |c, v| c.order = v));
        let mut coupling_options = shared_options();
        coupling_options.extend([masks_option(), mixing_option(), conditioner_option()]);
        vec![
            nsf.with_couples(true)
                .with_conditional_lr(crate::CONDITIONAL_LR)
                .with_conditional_rival(crate::CONDITIONAL_RIVAL)
                .with_options(coupling_options)
                .boxed(),
            nsf_ar.with_options(ar_options).boxed(),
        ]
    }
}

/// The options both kinds of spline flow take.
fn shared_options() -> Vec<ModelOption<NsfConfig>> {
    vec![
        options::layers(|c: &NsfConfig| c.layers, |c, v| c.layers = v),
        options::hidden(|c: &NsfConfig| c.hidden, |c, v| c.hidden = v),
        options::hidden_layers(|c: &NsfConfig| c.hidden_layers, |c, v| c.hidden_layers = v),
        options::activation(|c: &NsfConfig| c.activation, |c, v| c.activation = v),
        ModelOption::count(
            "bins",
            "Spline bins",
            (1, MAX_BINS),
            |c: &NsfConfig| c.spline.bins,
            |c, v| c.spline.bins = v,
        ),
        ModelOption::positive(
            "tail-bound",
            "Splines act on [−B, B] and are the identity outside",
            |c: &NsfConfig| c.spline.bound,
            |c, v| {
                c.spline.bound = v;
                Ok(())
            },
        ),
    ]
}

/// `--masks`: which features each coupling transforms.
fn masks_option() -> ModelOption<NsfConfig> {
    const HALVES: &str = "halves";
    const ALTERNATE: &str = "alternate";
    ModelOption::choice(
        "masks",
        "Which features each coupling layer transforms",
        vec![
            Choice::new(
                HALVES,
                "The second half of the features, then the first, in turn",
            ),
            Choice::new(ALTERNATE, "The odd features, then the even ones, in turn"),
        ],
        |c: &NsfConfig| match c.masks {
            Masks::Halves => HALVES,
            Masks::Alternate => ALTERNATE,
        },
        |c, (name, _)| {
            c.masks = if name == ALTERNATE {
                Masks::Alternate
            } else {
                Masks::Halves
            };
            Ok(())
        },
    )
}

/// `--mixing`: what follows each coupling.
fn mixing_option() -> ModelOption<NsfConfig> {
    const NONE: &str = "none";
    const LU: &str = "lu";
    ModelOption::choice(
        "mixing",
        "What mixes the features between coupling layers",
        vec![
            Choice::new(NONE, "Nothing: the masks alone"),
            Choice::new(
                LU,
                "A learned LU-parametrised linear map after each coupling, starting as the identity",
            ),
        ],
        |c: &NsfConfig| match c.mixing {
            Mixing::None => NONE,
            Mixing::Lu => LU,
        },
        |c, (name, _)| {
            c.mixing = if name == LU { Mixing::Lu } else { Mixing::None };
            Ok(())
        },
    )
}

/// `--conditioner`: the shape of each coupling's networks.
fn conditioner_option() -> ModelOption<NsfConfig> {
    const PLAIN: &str = "plain";
    const RESIDUAL: &str = "residual";
    ModelOption::choice(
        "conditioner",
        "The coupling layers' networks; --hidden-layers counts hidden layers of a plain one, blocks of a residual one. A conditional model (--context-dim) with a validation set and none of --conditioner, --hidden and --hidden-layers trains residual ones of two blocks of 64 and, on the same batches, plain ones of two layers of 128, and keeps whichever validates better",
        vec![
            Choice::new(PLAIN, "Hidden layers one after the other"),
            Choice::new(
                RESIDUAL,
                "An input layer, residual blocks of two layers with a skip connection around each, an output layer (sbi's NSF network)",
            ),
        ],
        |c: &NsfConfig| match c.network {
            Network::Plain => PLAIN,
            Network::Residual => RESIDUAL,
        },
        |c, (name, _)| {
            c.network = if name == RESIDUAL {
                Network::Residual
            } else {
                Network::Plain
            };
            Ok(())
        },
    )
}

impl Recipe for NsfConfig {
    fn family(&self) -> &'static str {
        match self.kind {
            NsfKind::Coupling => "nsf",
            NsfKind::Autoregressive => "nsf-ar",
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

    fn check_options(&self) -> Result<(), String> {
        if self.kind == NsfKind::Autoregressive {
            options::check_autoregressive_hidden(self.hidden, self.dim)?;
            if self.network != Network::Plain {
                return Err("--conditioner: autoregressive layers take plain networks".into());
            }
        }
        self.spline.check().map_err(|e| {
            let flag = if e.contains("tail bound") {
                "--tail-bound"
            } else {
                "--bins"
            };
            format!("{flag}: {e}")
        })
    }
}

impl LayerConfig for SplineLayer {
    fn check(&self, dim: usize, context_dim: usize) -> Result<(), String> {
        match self {
            Self::SplineCoupling(c) => c.check(dim, context_dim),
            Self::SplineAutoregressive(c) => LayerConfig::check(c, dim, context_dim),
            Self::LuLinear(c) => c.check(dim, context_dim),
        }
    }

    fn build(&self, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        match self {
            Self::SplineCoupling(c) => c.build(vb),
            Self::SplineAutoregressive(c) => c.build(vb),
            Self::LuLinear(c) => c.build(vb),
        }
    }
}
