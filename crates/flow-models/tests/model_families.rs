//! The families of models the registry lists, as their crates declare them: each
//! builds a flow from its defaults, names itself in the recipe it writes, and takes
//! its options by name with the one-line messages the command line shows.

use anyhow::Result;
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flow_core::{ImageInfo, ImageShape, ModelData};
use flow_maf::MafConfig;
use flow_models::{Family, ModelConfig, Registry};
use flow_nn::{Order, ScaleMap};
use flow_nsf::{NsfConfig, NsfKind};
use flow_realnvp::{CouplingKind, RealNvpConfig};

fn family(name: &str) -> Family {
    Registry::builtin().model_family(name).expect(name)
}

/// Data a family's defaults fit: three features, or 4×4 one-channel images.
fn data_for(f: &Family) -> ModelData {
    if f.is_image() {
        let image = ImageInfo {
            shape: ImageShape::new(1, 4, 4),
            pixel_levels: 256,
        };
        ModelData::new(16).with_image(Some(image))
    } else {
        ModelData::new(3)
    }
}

/// The message `family` gives for the options `given`, which must exist.
fn refused(name: &str, data: &ModelData, given: &[(&str, &str)]) -> String {
    family(name).model(data, given, 0).expect_err("refused")
}

#[test]
fn the_registry_lists_every_family_once_in_the_order_they_joined() {
    let names: Vec<&str> = Registry::builtin()
        .model_families()
        .iter()
        .map(|f| f.name())
        .collect();
    assert_eq!(
        names,
        [
            "realnvp",
            "nice",
            "nsf",
            "nsf-ar",
            "maf",
            "iaf",
            "glow",
            "realnvp-image"
        ]
    );
    assert_eq!(Registry::builtin().model_family("real-nvp"), None);
}

#[test]
fn every_family_builds_a_finite_flow_that_names_its_family() -> Result<()> {
    let dev = Device::Cpu;
    for f in Registry::builtin().model_families() {
        let data = data_for(f);
        // Small, so that every family builds quickly.
        let small: Vec<(&str, &str)> = [("layers", "2"), ("hidden", "8"), ("channels", "4")]
            .into_iter()
            .filter(|(n, _)| f.takes(n))
            .collect();
        let model = f.model(&data, &small, 0).map_err(anyhow::Error::msg)?;
        assert_eq!(model.family().as_ref(), Some(f), "{}", f.name());
        assert_eq!(model.dim, data.dim);
        model.validate().map_err(anyhow::Error::msg)?;
        let varmap = VarMap::new();
        let flow = model.build(VarBuilder::from_varmap(&varmap, DType::F64, &dev))?;
        // Fixed rows inside (0, 1), where an image flow's dequantised pixels lie.
        let values: Vec<f64> = (0..5 * data.dim)
            .map(|i| 0.1 + 0.8 * ((i * 37 % 101) as f64 / 101.0))
            .collect();
        let x = Tensor::from_vec(values, (5, data.dim), &dev)?;
        let log_prob: Vec<f64> = flow.log_prob(&x)?.to_vec1()?;
        assert!(
            log_prob.iter().all(|v| v.is_finite()),
            "{}: {log_prob:?}",
            f.name()
        );
        if f.is_image() {
            assert_eq!(model.image_info(), data.image, "{}", f.name());
        }
    }
    Ok(())
}

#[test]
fn each_option_reads_back_the_default_it_declares() -> Result<()> {
    for f in Registry::builtin().model_families() {
        let data = data_for(f);
        let model = f.model(&data, &[], 3).map_err(anyhow::Error::msg)?;
        for option in f.options() {
            let given = [(option.name, option.default.as_str())];
            let change = f
                .first_change(&model, &given, 3)
                .map_err(anyhow::Error::msg)?;
            assert_eq!(change, None, "{} --{}", f.name(), option.name);
        }
    }
    Ok(())
}

#[test]
fn options_set_the_fields_their_families_configurations_hold() -> Result<()> {
    let data = ModelData::new(4).with_context_dim(1);
    let realnvp = family("realnvp")
        .model(
            &data,
            &[
                ("clamp", "2"),
                ("layers", "3"),
                ("hidden", "16"),
                ("scale", "tanh"),
                ("nets", "joint"),
            ],
            0,
        )
        .map_err(anyhow::Error::msg)?;
    let expect = RealNvpConfig::new(4)
        .with_layers(3)
        .with_hidden(16)
        .with_scale(ScaleMap::Tanh { clamp: 2.0 })
        .with_nets(flow_nn::Nets::Joint)
        .with_context_dim(1);
    assert_eq!(realnvp, ModelConfig::realnvp(&expect));

    let nice = family("realnvp")
        .model(&data, &[("coupling", "additive")], 0)
        .map_err(anyhow::Error::msg)?;
    assert_eq!(nice.family(), Some(family("nice")));
    let expect = RealNvpConfig::new(4)
        .with_coupling(CouplingKind::Additive)
        .with_context_dim(1);
    assert_eq!(nice, ModelConfig::realnvp(&expect));

    let nsf_ar = family("nsf-ar")
        .model(
            &ModelData::new(3),
            &[("order", "random"), ("bins", "5"), ("tail-bound", "2.5")],
            7,
        )
        .map_err(anyhow::Error::msg)?;
    let mut expect = NsfConfig::new(3)
        .with_kind(NsfKind::Autoregressive)
        .with_order(Order::Random { seed: 7 });
    expect.spline.bins = 5;
    expect.spline.bound = 2.5;
    assert_eq!(nsf_ar, ModelConfig::nsf(&expect));

    let iaf = family("iaf")
        .model(&ModelData::new(3), &[("hidden-layers", "0")], 0)
        .map_err(anyhow::Error::msg)?;
    let expect = MafConfig::new(3).with_inverse(true).with_hidden_layers(0);
    assert_eq!(iaf, ModelConfig::maf(&expect));

    let glow = family("glow")
        .model(
            &data_for(&family("glow")),
            &[("scales", "1"), ("depth", "2"), ("channels", "4")],
            0,
        )
        .map_err(anyhow::Error::msg)?;
    let expect = flow_glow::GlowConfig::small(ImageShape::new(1, 4, 4))
        .with_levels(1)
        .with_depth(2)
        .with_hidden_channels(4);
    assert_eq!(glow, ModelConfig::glow(&expect));
    Ok(())
}

#[test]
fn values_out_of_bounds_and_options_of_other_families_are_refused_in_one_line() {
    use flow_core::limits::{MAX_BINS, MAX_LAYERS};
    let rows = ModelData::new(4);
    /// A family, its data, the options given and the message.
    type Case<'a> = (&'a str, &'a ModelData, &'a [(&'a str, &'a str)], String);
    let cases: [Case; 9] = [
        (
            "realnvp",
            &rows,
            &[("layers", "0")],
            "--layers must be at least 1, got 0".into(),
        ),
        (
            "maf",
            &rows,
            &[("layers", "99999999999")],
            format!("--layers 99999999999 is more than the largest allowed, {MAX_LAYERS}"),
        ),
        (
            "nsf",
            &rows,
            &[("bins", "99999")],
            format!("--bins 99999 is more than the largest allowed, {MAX_BINS}"),
        ),
        (
            "nsf",
            &rows,
            &[("tail-bound", "-1")],
            format!(
                "--tail-bound must be positive and finite in f32 (below {:e}), got -1",
                f32::MAX
            ),
        ),
        (
            "realnvp",
            &rows,
            &[("scale", "exp"), ("clamp", "2")],
            "--clamp bounds the soft-clamp and tanh scales, not --scale exp".into(),
        ),
        (
            "nice",
            &rows,
            &[("coupling", "affine")],
            "--coupling does not apply to nice".into(),
        ),
        (
            "maf",
            &rows,
            &[("hidden", "3")],
            "--hidden 3: an autoregressive network over 4 features needs at least 4 hidden units"
                .into(),
        ),
        (
            "realnvp",
            &rows,
            &[("order", "sideways")],
            "--order does not apply to realnvp".into(),
        ),
        (
            "glow",
            &ModelData::new(4).with_context_dim(1),
            &[],
            "`glow` models take no context features, got 1".into(),
        ),
    ];
    for (name, data, given, expect) in cases {
        assert_eq!(refused(name, data, given), expect, "{name} {given:?}");
    }
    let odd = ModelData::new(9).with_image(Some(ImageInfo {
        shape: ImageShape::new(1, 3, 3),
        pixel_levels: 256,
    }));
    let err = refused("glow", &odd, &[("scales", "2")]);
    assert!(err.starts_with("--scales 2 on 3x3x1 images: "), "{err}");
}

#[test]
fn a_recorded_recipe_names_the_first_option_that_would_change_it() -> Result<()> {
    let maf = family("maf");
    let model = maf
        .model(&ModelData::new(3), &[("layers", "3")], 5)
        .map_err(anyhow::Error::msg)?;
    let change = |given: &[(&'static str, &str)]| maf.first_change(&model, given, 5);
    assert_eq!(change(&[("layers", "3")]), Ok(None));
    assert_eq!(
        change(&[("layers", "3"), ("hidden", "9")]),
        Ok(Some("hidden"))
    );
    assert_eq!(change(&[("order", "alternate")]), Ok(None));
    assert_eq!(change(&[("order", "random")]), Ok(Some("order")));
    assert_eq!(
        change(&[("layers", "0")]),
        Err("--layers must be at least 1, got 0".to_string())
    );
    // A model without a recipe of the family: any option would change it.
    let bare = ModelConfig::new(3, model.layers.clone());
    assert_eq!(
        maf.first_change(&bare, &[("layers", "3")], 5),
        Ok(Some("layers"))
    );
    Ok(())
}
