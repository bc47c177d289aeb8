//! Reproducible parameter initialisation.

use std::sync::Mutex;

use candle::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{init::Init, var_builder::SimpleBackend, VarBuilder, VarMap};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution as _, StandardNormal};

/// A `VarBuilder` that creates trainable variables in `varmap`, drawing their initial
/// values from a host generator seeded with `seed`.
///
/// candle's own CPU generator cannot be seeded; with this builder the same seed and the
/// same construction order give bit-identical initial weights on every run and device.
/// Variables already present in `varmap` are reused as they are.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        rng: Mutex::new(StdRng::seed_from_u64(seed)),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

struct SeededVarMap {
    varmap: VarMap,
    rng: Mutex<StdRng>,
}

impl SeededVarMap {
    fn draw(&self, shape: &Shape, init: Init) -> Result<Vec<f64>> {
        let n = shape.elem_count();
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| candle::Error::Msg("initialisation generator poisoned".into()))?;
        let uniform = |rng: &mut StdRng, lo: f64, up: f64| -> Result<Vec<f64>> {
            if !(lo.is_finite() && up.is_finite() && lo < up) {
                candle::bail!("cannot initialise a tensor of shape {shape:?} from U({lo}, {up})");
            }
            Ok((0..n).map(|_| rng.random_range(lo..up)).collect())
        };
        let normal = |rng: &mut StdRng, mean: f64, std: f64| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    let e: f64 = StandardNormal.sample(&mut *rng);
                    mean + std * e
                })
                .collect::<Vec<f64>>()
        };
        Ok(match init {
            Init::Const(c) => vec![c; n],
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up)?,
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)?
                    }
                    candle_nn::init::NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                }
            }
        })
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(existing) = self
            .varmap
            .data()
            .lock()
            .ok()
            .and_then(|d| d.get(name).map(|v| v.as_tensor().clone()))
        {
            if existing.shape() != &s {
                candle::bail!("shape mismatch on {name}: {s:?} <> {:?}", existing.shape());
            }
            return Ok(existing);
        }
        let values = self.draw(&s, h)?;
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let tensor = var.as_tensor().clone();
        self.varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("variable map poisoned".into()))?
            .insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        self.varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("variable map poisoned".into()))?
            .get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle::Error::CannotFindTensor { path: name.into() })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}
