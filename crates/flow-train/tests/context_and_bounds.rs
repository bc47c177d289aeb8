//! What a model keeps of its training data beside its weights: the context's
//! standardisation (so a condition of any scale trains alike, and every caller passes
//! it in its own units) and the bounds of its data (samples stay inside, rows outside
//! are refused naming their place).

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor};
use flow_core::{Bijector, Bound, Bounded};
use flow_models::ModelConfig;
use flow_nsf::NsfConfig;
use flow_train::{
    data::{generate, generate_labeled, Dataset, Toy},
    Duration, Report, Reporter, TrainConfig, Trained, Trainer,
};
use rand::{rngs::StdRng, SeedableRng};

struct Silent;
impl Reporter for Silent {
    fn report(&mut self, _: &Report) {}
}

fn tensor(t: &Trained, name: &str) -> Result<Vec<f32>> {
    let vars = t.varmap.data().lock().expect("lock");
    let v = vars
        .get(name)
        .ok_or_else(|| anyhow::anyhow!("no tensor {name}"))?;
    Ok(v.as_tensor().to_vec1::<f32>()?)
}

fn train(model: ModelConfig, data: &Dataset, steps: usize) -> Result<Trained> {
    let cfg = TrainConfig::new(model)
        .with_duration(Duration::Steps(steps))
        .with_batch_size(256);
    Ok(Trainer::new(cfg, &Device::Cpu)?.fit(data, None, &mut Silent)?)
}

#[test]
fn a_context_trains_alike_at_any_scale_and_is_read_in_its_own_units() -> Result<()> {
    let data = generate_labeled(Toy::Moons, 1000, Some(0.05), 1)?.split_context(1, "moons")?;
    // The same condition in other units: c' = 1000·c + 5000.
    let scaled = Dataset {
        context: data.context.iter().map(|c| 1000.0 * c + 5000.0).collect(),
        ..data.clone()
    };
    let model = || {
        ModelConfig::nsf(
            &NsfConfig::new(2)
                .with_layers(2)
                .with_hidden(16)
                .with_context_dim(1),
        )
    };
    let (a, b) = (train(model(), &data, 40)?, train(model(), &scaled, 40)?);
    ensure!(a.model.standardize_context && b.model.standardize_context);
    let (mean, std) = (
        tensor(&b, "context_standardize.mean")?,
        tensor(&b, "context_standardize.std")?,
    );
    let (mean_a, std_a) = (
        tensor(&a, "context_standardize.mean")?,
        tensor(&a, "context_standardize.std")?,
    );
    ensure!(
        (mean[0] - (1000.0 * mean_a[0] + 5000.0)).abs() < 1e-2
            && (std[0] - 1000.0 * std_a[0]).abs() < 1e-2,
        "statistics {mean:?} {std:?} against {mean_a:?} {std_a:?}"
    );
    // Given each its own units, the two models are one density.
    let test = generate_labeled(Toy::Moons, 300, Some(0.05), 2)?.split_context(1, "test")?;
    let x = test.to_tensor(&Device::Cpu)?;
    let c = test.context_tensor(&Device::Cpu)?.expect("context");
    let lp_a = a.flow.log_prob_with_context(&x, Some(&c))?;
    let lp_b = b
        .flow
        .log_prob_with_context(&x, Some(&c.affine(1000.0, 5000.0)?))?;
    let gap = (&lp_a - &lp_b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    ensure!(gap < 1e-3, "log-probs differ by {gap}");

    // Saved and loaded, the statistics travel with the model.
    let dir = std::env::temp_dir().join(format!("flows-context-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("scaled.safetensors");
    b.checkpoint.save(&path, Some(&b.summary))?;
    let loaded = flow_io::load_model(&path, DType::F32, &Device::Cpu)?;
    let lp = loaded
        .flow
        .log_prob_with_context(&x, Some(&c.affine(1000.0, 5000.0)?))?;
    ensure!(
        lp.to_vec1::<f32>()? == lp_b.to_vec1::<f32>()?,
        "log-probs changed through save and load"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_bounded_model_keeps_to_its_box() -> Result<()> {
    let bounds = vec![
        Bound::new(Some(-1.5), Some(2.5)),
        Bound::new(Some(-1.0), None),
    ];
    let data = generate(Toy::Moons, 1000, Some(0.05), 3)?;
    let model = ModelConfig::nsf(&NsfConfig::new(2).with_layers(2).with_hidden(16))
        .with_bounds(bounds.clone());
    let t = train(model.clone(), &data, 60)?;
    // The standardisation follows the bounds' map: its statistics are the mapped
    // training rows'.
    let map = Bounded::new(&bounds, DType::F64, &Device::Cpu)?;
    let rows = t.summary.n_train;
    let (train_rows, _) = flow_train::data::hold_out(&data, 0.1, 0);
    ensure!(train_rows.len() == rows);
    let (y, _) = map.forward(&train_rows.to_tensor(&Device::Cpu)?.to_dtype(DType::F64)?)?;
    let mean = y.mean(0)?.to_vec1::<f64>()?;
    let stored = tensor(&t, "standardize.mean")?;
    for j in 0..2 {
        ensure!(
            (mean[j] - f64::from(stored[j])).abs() < 1e-4,
            "standardisation mean {stored:?}, mapped data {mean:?}"
        );
    }
    let s = t
        .flow
        .sample_with_context(20_000, 1.5, None, &mut StdRng::seed_from_u64(5))?;
    for row in s.to_vec2::<f32>()? {
        ensure!(
            (-1.5..=2.5).contains(&row[0]) && row[1] >= -1.0,
            "a sample outside the box: {row:?}"
        );
    }
    // A row outside is refused, naming its row and column (from 1).
    let mut outside = data.clone();
    outside.values[2 * 6 + 1] = -1.25;
    let err = Trainer::new(TrainConfig::new(model), &Device::Cpu)?
        .fit(&outside, None, &mut Silent)
        .map(|_| ())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(
        err == "training data: row 7, column 2: -1.25 lies outside the model's bounds -1:inf (ends excluded)",
        "{err}"
    );
    let x = Tensor::new(&[[0.5f32, 0.5]], &Device::Cpu)?;
    ensure!(t.flow.log_prob(&x)?.to_vec1::<f32>()?[0].is_finite());
    Ok(())
}
