//! `flows.Flow`: a model built from `flow train`'s options, or read from a file.

use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use flow_io::{Checkpoint, ImportOptions, Source};
use flow_models::{
    options::{self, ModelOptions, MODEL_SETTINGS},
    Family, ModelConfig, ModelDensity, OptionKind, Registry,
};
use flow_train::{
    recipe::{train_config, RunOptions},
    TrainCheckpoint, TrainSummary,
};
use pyo3::{
    prelude::*,
    types::{PyAny, PyDict},
};
use rand::{rngs::StdRng, SeedableRng};

use crate::{
    arrays::{to_numpy, Rows},
    errors::{value_error, Fail},
};

/// Rows evaluated or drawn at a time, as `flow` reads and writes them: memory does not
/// grow with the rows, and the draws of a seed are those of `flow sample --seed`.
const CHUNK_ROWS: usize = 16_384;

/// What names the data in messages about the model's shape.
const DATA: &str = "the data";

/// A model that can be evaluated: trained here, or read from a file.
pub(crate) struct Fitted {
    pub flow: flow_core::Flow,
    pub saved: Saved,
    /// The file the weights were read from (a model or another tool's state dict),
    /// which an export must not overwrite.
    pub from: Option<PathBuf>,
}

/// What `save` writes.
pub(crate) enum Saved {
    /// A run trained here: the model with its training state, resumable by
    /// `flow train --resume`, and the run's summary.
    Trained {
        checkpoint: Box<TrainCheckpoint>,
        summary: Box<TrainSummary>,
    },
    /// A file read, or weights imported: written back as they were.
    Read(Box<Checkpoint>),
}

/// A normalizing flow over `features` features, conditioned on `context` features
/// (0: unconditional), of the family `flow` (`realnvp`, `nice`, `nsf`, `nsf-ar`,
/// `maf`, `iaf`), with `flow train`'s model options as keywords: `layers`,
/// `hidden`, `hidden_layers`, `activation`, `bins`, `tail_bound`, `masks`, `mixing`,
/// `order`, `coupling`, `scale`, `clamp`, `nets`, `base`, `standardize` (the data and any
/// context, by default), `bounds` (`"LOW:HIGH,…"` as `flow train --bounds` takes it,
/// or one `(low, high)` pair per feature, `None` or an infinity for an open side) and
/// `bounds_by` (`"logit"`, the default, or `"rejection"`, as `flow train --bounds-by`).
#[pyclass(module = "flows")]
pub struct Flow {
    pub(crate) family: Option<Family>,
    /// The model as configured: what `fit` trains afresh, or after `fit`, the model
    /// it kept.
    pub(crate) config: ModelConfig,
    /// Where the family trains a rival network beside its own (a conditional NSF),
    /// both, labelled, its own first: `fit` then keeps whichever validates better.
    pub(crate) candidates: Vec<(String, ModelConfig)>,
    pub(crate) fitted: Option<Fitted>,
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow")
            .field("family", &self.family)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The model's own keywords, beside the families' options.
const OWN_KEYWORDS: [&str; 4] = ["base", "standardize", "bounds", "bounds_by"];

/// The model options given as keywords, by their Python names (the options' names
/// with `_` for `-`).
fn model_options(options: Option<&Bound<'_, PyDict>>, context: usize) -> PyResult<ModelOptions> {
    let mut o = ModelOptions {
        context_dim: (context > 0).then_some(context),
        ..ModelOptions::default()
    };
    let Some(options) = options else {
        return Ok(o);
    };
    let declared = Registry::builtin().options();
    // The options of the families a Python model may be: those over rows.
    let of_rows = |families: &[(Family, String)]| families.iter().any(|(f, _)| !f.is_image());
    for (key, value) in options.iter() {
        let key: String = key.extract()?;
        match key.as_str() {
            "base" => {
                o.base = Some(value.extract()?);
                continue;
            }
            "standardize" => {
                o.no_standardize = !value.extract::<bool>()?;
                continue;
            }
            "bounds" => {
                o.bounds = Some(bounds_text(&value)?);
                continue;
            }
            "bounds_by" => {
                o.bounds_by = Some(value.extract()?);
                continue;
            }
            _ => {}
        }
        let name = key.replace('_', "-");
        let image_setting = MODEL_SETTINGS
            .iter()
            .any(|(s, images)| *s == name && *images);
        let option = declared.iter().find(|d| d.name == name);
        if image_setting || option.is_some_and(|d| !of_rows(&d.families)) {
            return Err(value_error(format!(
                "`{key}` is an option of the image families ({}), which train with `flow train`",
                options::taking(&name)
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let Some(option) = option else {
            let names: Vec<String> = declared
                .iter()
                .filter(|d| of_rows(&d.families))
                .map(|d| d.name.replace('-', "_"))
                .chain(OWN_KEYWORDS.map(String::from))
                .collect();
            let (last, rest) = names.split_last().expect("options");
            return Err(value_error(format!(
                "unknown option `{key}`: the model options are {} and {last}",
                rest.join(", ")
            )));
        };
        let text = match option.kind {
            OptionKind::Count { .. } => count(&value, option.name)?.to_string(),
            // The shortest text that reads back as the same number (`1e-320`).
            OptionKind::Positive | OptionKind::NonNegative => format!("{:?}", value.extract::<f64>()?),
            OptionKind::Choice(_) => value.extract::<String>()?,
        };
        o.set(option.name, text).map_err(value_error)?;
    }
    Ok(o)
}

/// The `bounds` keyword as `flow train --bounds` spells it: the text itself, or
/// `(low, high)` pairs, `None` for an open side.
fn bounds_text(value: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(text) = value.extract::<String>() {
        return Ok(text);
    }
    let pairs: Vec<(Option<f64>, Option<f64>)> = value.extract().map_err(|_| {
        value_error("bounds: expected \"LOW:HIGH,…\" or one (low, high) pair per feature")
    })?;
    let side = |v: Option<f64>, open: &str| v.map_or(open.to_string(), |v| format!("{v:?}"));
    Ok(pairs
        .iter()
        .map(|&(low, high)| format!("{}:{}", side(low, "-inf"), side(high, "inf")))
        .collect::<Vec<_>>()
        .join(","))
}

/// A count option: a non-negative whole number (the bounds are the library's).
fn count(value: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    whole(&format!("--{name}"), value.extract()?)
}

/// A whole number that must not be negative, `name`d in the error: read wider than
/// `usize`, so that a negative or oversized int is a `ValueError` saying so rather than
/// an `OverflowError` from the conversion. Its bounds are the library's.
pub(crate) fn whole(name: &str, v: i128) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| {
        value_error(match v < 0 {
            true => format!("{name} must be at least 0, got {v}"),
            false => format!("{name} {v}: more than {}", usize::MAX),
        })
    })
}

/// A seed: a whole number of 64 bits, as `flow` takes one (read wider, so that the
/// whole range is accepted and anything outside it named).
pub(crate) fn seed(value: Option<i128>) -> PyResult<Option<u64>> {
    value
        .map(|v| {
            u64::try_from(v).map_err(|_| {
                value_error(format!(
                    "seed must be a whole number from 0 to {}, got {v}",
                    u64::MAX
                ))
            })
        })
        .transpose()
}

/// The context given for `rows` points of a model with `context_dim` context
/// features: required when the model is conditional, one row for every point or one
/// row per point.
pub(crate) fn context_rows(
    context: Option<&Bound<'_, PyAny>>,
    context_dim: usize,
    rows: usize,
) -> PyResult<Option<Rows>> {
    let Some(c) = context.filter(|c| !c.is_none()) else {
        if context_dim > 0 {
            return Err(value_error(format!(
                "the model is conditional on {context_dim} context features: give context"
            )));
        }
        return Ok(None);
    };
    if context_dim == 0 {
        return Err(value_error("context: the model is not conditional"));
    }
    let c = Rows::read(c, context_dim, "context")?;
    if c.rows != 1 && c.rows != rows {
        return Err(value_error(format!(
            "context has {} rows for {rows} points: give one row for all of them or one per point",
            c.rows
        )));
    }
    Ok(Some(c))
}

/// Rows `start..start + len` of `rows` as a tensor (a single context row: itself).
fn chunk(rows: &Rows, start: usize, len: usize) -> candle::Result<Tensor> {
    if rows.rows == 1 {
        return rows.tensor();
    }
    let cols = rows.cols;
    Tensor::from_slice(
        &rows.values[start * cols..(start + len) * cols],
        (len, cols),
        &Device::Cpu,
    )
}

/// `f` over `x` and its context, [`CHUNK_ROWS`] rows at a time, the results'
/// values concatenated.
fn chunked(
    x: &Rows,
    context: Option<&Rows>,
    mut f: impl FnMut(&Tensor, Option<&Tensor>) -> candle::Result<Tensor>,
) -> Result<Vec<f32>, Fail> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < x.rows {
        let len = CHUNK_ROWS.min(x.rows - start);
        let xs = chunk(x, start, len)?;
        let cs = context.map(|c| chunk(c, start, len)).transpose()?;
        let y = f(&xs, cs.as_ref())?.detach();
        out.extend(y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        start += len;
    }
    Ok(out)
}

impl Flow {
    pub(crate) fn fitted(&self) -> PyResult<&Fitted> {
        self.fitted.as_ref().ok_or_else(|| {
            value_error(
                "the flow has not been fitted: call fit(x) first, or flows.load a saved model",
            )
        })
    }

    /// A model read from `path`, as every `flow` command reads it.
    pub(crate) fn load(path: &Path) -> Result<Self, Fail> {
        let loaded = flow_io::load_model(path, DType::F32, &Device::Cpu)?;
        Ok(Self::read(loaded.flow, loaded.checkpoint, path))
    }

    fn read(flow: flow_core::Flow, checkpoint: Checkpoint, from: &Path) -> Self {
        Self {
            family: checkpoint.config.family(),
            config: checkpoint.config.clone(),
            candidates: Vec::new(),
            fitted: Some(Fitted {
                flow,
                saved: Saved::Read(Box::new(checkpoint)),
                // Absolute, so that a later change of directory does not change it.
                from: Some(std::path::absolute(from).unwrap_or_else(|_| from.to_path_buf())),
            }),
        }
    }

    /// Another tool's weights, converted, checked and built; with the settings the
    /// conversion assumed, one line each.
    pub(crate) fn import(
        source: Source,
        path: &Path,
        opts: &ImportOptions,
    ) -> Result<(Self, Vec<String>), Fail> {
        let imported = flow_io::import(source, path, opts)?;
        let assumed = imported
            .assumptions
            .iter()
            .map(ToString::to_string)
            .collect();
        let mut extra = std::collections::BTreeMap::new();
        extra.insert("imported_from".to_string(), source.name().to_string());
        let checkpoint = Checkpoint {
            config: imported.config,
            summary: None,
            extra,
            tensors: imported.tensors,
        };
        let loaded = flow_io::build_checked(path, checkpoint, DType::F32, &Device::Cpu)?;
        Ok((Self::read(loaded.flow, loaded.checkpoint, path), assumed))
    }

    pub(crate) fn save_to(&self, path: &Path) -> Result<(), Fail> {
        safetensors_path(path)?;
        let fitted = self
            .fitted
            .as_ref()
            .ok_or("the flow has not been fitted: nothing to save")?;
        match &fitted.saved {
            Saved::Trained {
                checkpoint,
                summary,
            } => checkpoint.save(path, Some(summary.as_ref()))?,
            Saved::Read(ck) => flow_io::save(
                path,
                &ck.config,
                &ck.tensors,
                ck.summary.as_ref(),
                &ck.extra,
            )?,
        }
        Ok(())
    }
}

impl Flow {
    /// Refuses rows outside the model's bounds, naming the first: no density or
    /// latent is defined there.
    fn check_bounds(&self, x: &Rows) -> PyResult<()> {
        match self.config.outside_bounds(&x.values) {
            Some(outside) => Err(value_error(format!("x: {outside}"))),
            None => Ok(()),
        }
    }
}

#[pymethods]
impl Flow {
    #[new]
    #[pyo3(signature = (features, context = 0, flow = "nsf", **options))]
    fn new(
        features: i128,
        context: i128,
        flow: &str,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let (features, context) = (whole("features", features)?, whole("context", context)?);
        let family = options::family(flow).map_err(value_error)?;
        if family.is_image() {
            return Err(value_error(format!(
                "--flow {}: the image families train with `flow train`; a model it saves loads with flows.load",
                family.name()
            )));
        }
        let options = model_options(options, context)?;
        let model = |options: &ModelOptions| {
            train_config(
                &family,
                DATA,
                features,
                context,
                None,
                options,
                &RunOptions::default(),
                false,
            )
            .map(|cfg| cfg.model)
            .map_err(value_error)
        };
        let config = model(&options)?;
        let candidates = match options.rival(&family, context) {
            Some(rival) => vec![
                (format!("the {} defaults", family.name()), config.clone()),
                (family.conditional_rival_flags(), model(&rival)?),
            ],
            None => Vec::new(),
        };
        Ok(Self {
            family: Some(family),
            config,
            candidates,
            fitted: None,
        })
    }

    /// Features per point.
    #[getter]
    fn features(&self) -> usize {
        self.config.dim
    }

    /// Context features per point (0: unconditional).
    #[getter]
    fn context(&self) -> usize {
        self.config.context_dim
    }

    /// The family's name, or `None` for a model without one (imported weights).
    #[getter]
    fn flow(&self) -> Option<&'static str> {
        self.family.as_ref().map(|f| f.name())
    }

    /// The model's configuration, as the file's metadata holds it.
    #[getter]
    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        json_value(
            py,
            &serde_json::to_value(&self.config).map_err(|e| value_error(e.to_string()))?,
        )
    }

    /// The last training run's summary, if the model was trained.
    #[getter]
    fn summary(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let value = match self.fitted.as_ref().map(|f| &f.saved) {
            Some(Saved::Trained { summary, .. }) => {
                serde_json::to_value(summary).map_err(|e| value_error(e.to_string()))?
            }
            Some(Saved::Read(ck)) => match &ck.summary {
                Some(s) => s.clone(),
                None => return Ok(None),
            },
            None => return Ok(None),
        };
        json_value(py, &value).map(Some)
    }

    fn __repr__(&self) -> String {
        let flow = self
            .family
            .as_ref()
            .map_or("None".to_string(), |f| format!("'{}'", f.name()));
        format!(
            "Flow(features={}, context={}, flow={flow}, fitted={})",
            self.config.dim,
            self.config.context_dim,
            if self.fitted.is_some() {
                "True"
            } else {
                "False"
            }
        )
    }

    /// `log p(x)` (nats) of each row of `x`, `(rows, features)`, given `context`
    /// (one row for every point, or one per point) for a conditional model.
    #[pyo3(signature = (x, context = None))]
    fn log_prob(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let fitted = self.fitted()?;
        let x = Rows::read(x, self.config.dim, "x")?;
        self.check_bounds(&x)?;
        let c = context_rows(context, self.config.context_dim, x.rows)?;
        let values = py
            .detach(|| -> Result<Vec<f32>, Fail> {
                let mut density = ModelDensity::new(&self.config, &fitted.flow)?;
                chunked(&x, c.as_ref(), |x, c| density.log_prob(x, c))
            })
            .map_err(Fail::into_py)?;
        to_numpy(py, values, x.rows, None, x.double)
    }

    /// The latents `z = f(x)` of the rows of `x`.
    #[pyo3(signature = (x, context = None))]
    fn encode(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let fitted = self.fitted()?;
        let x = Rows::read(x, self.config.dim, "x")?;
        self.check_bounds(&x)?;
        let c = context_rows(context, self.config.context_dim, x.rows)?;
        let values = py
            .detach(|| chunked(&x, c.as_ref(), |x, c| fitted.flow.encode_with_context(x, c)))
            .map_err(Fail::into_py)?;
        to_numpy(py, values, x.rows, Some(x.cols), x.double)
    }

    /// The data points `x = f⁻¹(z)` of the latents `z`.
    #[pyo3(signature = (z, context = None))]
    fn decode(
        &self,
        py: Python<'_>,
        z: &Bound<'_, PyAny>,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let fitted = self.fitted()?;
        let z = Rows::read(z, self.config.dim, "z")?;
        let c = context_rows(context, self.config.context_dim, z.rows)?;
        let values = py
            .detach(|| chunked(&z, c.as_ref(), |z, c| fitted.flow.decode_with_context(z, c)))
            .map_err(Fail::into_py)?;
        to_numpy(py, values, z.rows, Some(z.cols), z.double)
    }

    /// `n` samples, `(n, features)`, float64 unless the context is float32. A
    /// conditional model takes `context`: one row for all `n`, or `n` rows, one sample
    /// each. The same `seed` draws the same samples as `flow sample --seed`; without
    /// one, the draw is seeded from the system's entropy.
    #[pyo3(signature = (n, context = None, seed = None))]
    fn sample(
        &self,
        py: Python<'_>,
        n: i128,
        context: Option<&Bound<'_, PyAny>>,
        seed: Option<i128>,
    ) -> PyResult<Py<PyAny>> {
        let n = whole("n", n)?;
        let fitted = self.fitted()?;
        let dim = self.config.dim;
        flow_core::limits::check_at_most("samples", n, flow_core::limits::MAX_SAMPLES)
            .map_err(value_error)?;
        // All of them are returned in one array.
        flow_core::limits::checked_product(
            "samples",
            &[n, dim],
            flow_core::limits::MAX_TENSOR_ELEMENTS,
        )
        .map_err(value_error)?;
        let c = context_rows(context, self.config.context_dim, n)?;
        let double = c.as_ref().is_none_or(|c| c.double);
        let mut rng = match self::seed(seed)? {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let values = py
            .detach(|| -> Result<Vec<f32>, Fail> {
                let density = ModelDensity::new(&self.config, &fitted.flow)?;
                let mut out = Vec::with_capacity(n * dim);
                let mut start = 0;
                while start < n {
                    let len = CHUNK_ROWS.min(n - start);
                    let cs = c.as_ref().map(|c| chunk(c, start, len)).transpose()?;
                    let x = density
                        .sample(len, 1.0, cs.as_ref(), &mut rng)?
                        .detach();
                    out.extend(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
                    start += len;
                }
                Ok(out)
            })
            .map_err(Fail::into_py)?;
        to_numpy(py, values, n, Some(dim), double)
    }

    /// Fits the model to the rows of `x` (with `context` for a conditional model), as
    /// `flow train` does, from a fresh initialisation; `validation` (rows, or
    /// `(rows, context)`) is scored during training and the best weights kept; without
    /// it, `val_fraction` of the rows (0.1 unless given; 0: none) are held out to
    /// score instead. Training stops early after `patience` scores without
    /// improvement. The run options are `flow train`'s: `steps`, `batch`, `lr`,
    /// `seed`, and as keywords `epochs`, `optimizer`, `weight_decay`, `schedule`,
    /// `lr_decay`, `warmup`, `clip_grad`, `val_every`, `patience`, `val_fraction`. Ctrl-C stops training after the current
    /// step, keeping its weights. Returns the run's summary. A conditional `nsf`
    /// whose network no option sets trains two with a validation set, as `flow
    /// train` does, and keeps the better: the summary's `rivals` lists the other.
    #[pyo3(signature = (x, context = None, steps = None, batch = None, lr = None, seed = None, validation = None, progress = true, **run_options))]
    #[allow(clippy::too_many_arguments)]
    fn fit(
        &mut self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        context: Option<&Bound<'_, PyAny>>,
        steps: Option<i128>,
        batch: Option<i128>,
        lr: Option<f64>,
        seed: Option<i128>,
        validation: Option<&Bound<'_, PyAny>>,
        progress: bool,
        run_options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let mut run = crate::training::run_options(run_options)?;
        run.steps = steps.map(|s| whole("steps", s)).transpose()?;
        run.batch = batch.map(|b| whole("batch", b)).transpose()?;
        run.lr = lr;
        run.seed = self::seed(seed)?;
        crate::training::fit(self, py, x, context, validation, run, progress)
    }

    /// Writes the model to `path` (safetensors, as `flow train` writes it: every
    /// `flow` command reads it, and a model trained here resumes with
    /// `flow train --resume`).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.save_to(&path)).map_err(Fail::into_py)
    }

    /// Writes the model's weights to `path` in another tool's layout (`zuko`, or
    /// `seed`), as `flow export --to` does; returns what loads them there.
    #[pyo3(signature = (path, to = "zuko"))]
    fn export(&self, py: Python<'_>, path: PathBuf, to: &str) -> PyResult<String> {
        let target = options::choice("to", to, &flow_io::Target::ALL, flow_io::Target::name)
            .map_err(value_error)?;
        safetensors_path(&path).map_err(Fail::into_py)?;
        let fitted = self.fitted()?;
        if let Some(from) = fitted.from.as_deref().filter(|f| flow_io::same_file(&path, f)) {
            return Err(value_error(format!(
                "{}: the model was read from this file: export to another path",
                from.display()
            )));
        }
        let (config, tensors) = match &fitted.saved {
            Saved::Trained { checkpoint, .. } => (&checkpoint.model, &checkpoint.tensors),
            Saved::Read(ck) => (&ck.config, &ck.tensors),
        };
        py.detach(|| flow_io::export(target, &path, config, tensors))
            .map_err(|e| Fail::from(e).into_py())
    }
}

/// Refuses a path whose extension is not `.safetensors` (any case): a model file is
/// in the format its extension names, as every `flow` command writes it.
fn safetensors_path(path: &Path) -> Result<(), Fail> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("safetensors") {
        return Ok(());
    }
    Err(format!(
        "{}: a model is written as safetensors: give a path ending in .safetensors",
        path.display()
    )
    .into())
}

/// A JSON value as the Python object `json.loads` makes of it.
pub(crate) fn json_value(py: Python<'_>, value: &serde_json::Value) -> PyResult<Py<PyAny>> {
    let json = py.import("json")?;
    Ok(json.call_method1("loads", (value.to_string(),))?.unbind())
}
