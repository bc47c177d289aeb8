//! What a training run needs to continue exactly where it stopped, and its file format:
//! a model checkpoint (`flow-io`) whose metadata also holds the training configuration
//! and state, and whose tensors also hold the optimizer's moments and, where they
//! differ from the model's, the best and the current weights.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::Flow;
use flow_models::{ModelConfig, Registry};
use serde::{Deserialize, Serialize};

use crate::{data::Dataset, TrainConfig, TrainError, TrainSummary};

/// Prefix of the tensors that belong to the training state, not to the model.
pub const STATE_PREFIX: &str = flow_io::STATE_PREFIX;

/// Metadata keys of the training configuration and state.
const META_CONFIG: &str = "train_config";
const META_STATE: &str = "train_state";

/// The scalar part of a run's state; the optimizer moments, the best weights and the
/// weights training stopped at travel as tensors
/// under [`STATE_PREFIX`], named by `StateGroup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed (the schedule's position).
    pub step: usize,
    /// Adam's own step count (skipped batches do not advance it).
    pub adam_step: usize,
    /// Batch order: epoch `e` shuffles with a generator seeded from `(seed, e)`, and
    /// `pos` samples of it have been used.
    pub epoch: usize,
    pub pos: usize,
    pub best_val_nll: Option<f64>,
    pub best_step: Option<usize>,
    pub since_best: usize,
    /// NaN until a step succeeds (written as `null`).
    #[serde(with = "nan_as_null")]
    pub last_loss: f64,
    pub skipped: usize,
    pub elapsed_secs: f64,
    /// Identifies the training data, so a run is only resumed on the same data.
    pub data_fingerprint: String,
    /// With rows streamed from a file: the chunk size and where the run stands in the
    /// epoch's order of chunks (`pos` says the same; this says it in chunks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamPosition>,
}

/// Where a run that streams its rows stands within epoch `epoch`: `row` rows into
/// the `chunk`-th chunk of the epoch's order of chunks of `chunk_rows` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub chunk_rows: usize,
    pub chunk: usize,
    pub row: usize,
}

impl TrainState {
    /// Checks that the counters agree with one another, whatever the data: a state
    /// read from a file is trusted with nothing it has not passed.
    pub fn validate(&self) -> Result<(), String> {
        // A position is within one epoch of the data, whose rows are bounded like any
        // other size; the data themselves are checked by `check_rows`.
        flow_core::limits::check_at_most(
            "rows into the data (`pos`)",
            self.pos,
            flow_core::limits::MAX_ROWS,
        )?;
        let after_step = |what: &str, value: usize| {
            if value > self.step {
                return Err(format!(
                    "`{what}` is {value}, after the {} steps taken (`step`)",
                    self.step
                ));
            }
            Ok(())
        };
        after_step("adam_step", self.adam_step)?;
        after_step("since_best", self.since_best)?;
        after_step("skipped", self.skipped)?;
        if let Some(best) = self.best_step {
            after_step("best_step", best)?;
        }
        if self.best_val_nll.is_some() != self.best_step.is_some() {
            return Err("`best_val_nll` and `best_step` must be given together".into());
        }
        if let Some(v) = self.best_val_nll.filter(|v| !v.is_finite()) {
            return Err(format!("`best_val_nll` must be finite, got {v}"));
        }
        if !(self.elapsed_secs.is_finite() && self.elapsed_secs >= 0.0) {
            return Err(format!(
                "`elapsed_secs` must be a time, got {}",
                self.elapsed_secs
            ));
        }
        Ok(())
    }

    /// Checks that the position fits data of `rows` rows.
    pub fn check_rows(&self, rows: usize) -> Result<(), String> {
        if self.pos > rows {
            return Err(format!(
                "the training state is at row {} of the data, which has {rows}",
                self.pos
            ));
        }
        Ok(())
    }
}

/// `f64` that writes NaN (which JSON lacks) as `null` and reads it back.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// A run's model, settings and state: what [`Trainer::fit_with`](crate::Trainer::fit_with)
/// resumes from.
#[derive(Debug, Clone)]
pub struct TrainCheckpoint {
    pub model: ModelConfig,
    pub config: TrainConfig,
    pub state: TrainState,
    /// Model tensors under their usual names, state tensors under [`STATE_PREFIX`].
    pub tensors: HashMap<String, Tensor>,
    /// The flow [`load_on`](Self::load_on) built while checking the tensors, which a
    /// run resuming on that device and dtype takes over instead of building its own.
    pub(crate) built: Option<Arc<Built>>,
}

/// A flow built over a checkpoint's tensors, on `device` in `dtype`.
pub(crate) struct Built {
    pub model: ModelConfig,
    pub flow: Flow,
    pub varmap: VarMap,
    pub dtype: DType,
    pub device: Device,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl TrainCheckpoint {
    /// Writes it to `path` (atomically) as a model checkpoint that also holds the
    /// training configuration and state, with the run's summary if given. Any tool that
    /// reads models reads it; `flow train --resume` continues it.
    pub fn save(&self, path: &Path, summary: Option<&TrainSummary>) -> Result<(), TrainError> {
        let mut extra = BTreeMap::new();
        extra.insert(META_CONFIG.to_string(), to_json(path, &self.config)?);
        extra.insert(META_STATE.to_string(), to_json(path, &self.state)?);
        let summary = summary
            .map(|s| serde_json::from_str(&to_json(path, s)?).map_err(|e| invalid(path, e)))
            .transpose()?;
        flow_io::save(path, &self.model, &self.tensors, summary.as_ref(), &extra)?;
        Ok(())
    }

    /// Reads a file written by [`save`](Self::save), checking its tensors against the
    /// model (built with the families of `registry`, on the CPU in the dtype a
    /// trainer trains in by default).
    pub fn load(path: &Path, registry: &Registry) -> Result<Self, TrainError> {
        Self::load_on(path, registry, crate::DEFAULT_DTYPE, &Device::Cpu)
    }

    /// [`load`](Self::load), the model built on `device` in `dtype`: a run that resumes
    /// there takes that flow over, so that resuming builds the model once.
    pub fn load_on(
        path: &Path,
        registry: &Registry,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let ck = flow_io::load(path)?;
        let fail = |message: String| TrainError::NotResumable {
            path: path.to_path_buf(),
            message,
        };
        let state = ck.extra.get(META_STATE).ok_or_else(|| {
            fail("holds no training state (it was not written by `flow train` or TrainCheckpoint::save)".into())
        })?;
        let state: TrainState = serde_json::from_str(state)
            .map_err(|e| fail(format!("invalid training state: {e}")))?;
        state
            .validate()
            .map_err(|e| fail(format!("invalid training state: {e}")))?;
        let config = ck
            .extra
            .get(META_CONFIG)
            .ok_or_else(|| fail("holds no training configuration".into()))?;
        let config: TrainConfig = serde_json::from_str(config)
            .map_err(|e| fail(format!("invalid training configuration: {e}")))?;
        let loaded = flow_io::build_checked_with(path, ck, registry, dtype, device)?;
        let model = loaded.checkpoint.config;
        let built = Built {
            model: model.clone(),
            flow: loaded.flow,
            varmap: loaded.varmap,
            dtype,
            device: device.clone(),
        };
        Ok(Self {
            model,
            config,
            state,
            tensors: loaded.checkpoint.tensors,
            built: Some(Arc::new(built)),
        })
    }

    /// The flow built at loading and its variables, if it was built for `model` on
    /// `device` in `dtype` and this checkpoint is its only holder.
    pub(crate) fn take_built(
        &mut self,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Option<(Flow, VarMap)> {
        let built = Arc::try_unwrap(self.built.take()?).ok()?;
        let fits =
            built.model == *model && built.dtype == dtype && built.device.same_device(device);
        fits.then_some((built.flow, built.varmap))
    }
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> TrainError {
    flow_io::IoError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
    .into()
}

fn to_json(path: &Path, value: &impl Serialize) -> Result<String, TrainError> {
    serde_json::to_string(value).map_err(|e| invalid(path, e))
}

// The training state's tensors. Every name of a state tensor is made here: each
// group holds one tensor per trainable variable, named `{STATE_PREFIX}{group}.{var}`.

/// A group of state tensors, one tensor per trainable variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateGroup {
    /// The optimizer's first moments.
    AdamM,
    /// The optimizer's second moments.
    AdamV,
    /// The weights of the best validation score so far.
    Best,
    /// The weights training stopped at, where the model holds the best ones instead.
    Current,
}

impl StateGroup {
    /// The name of this group's tensor for the variable `var`.
    pub(crate) fn tensor_name(self, var: &str) -> String {
        let group = match self {
            Self::AdamM => "adam.m",
            Self::AdamV => "adam.v",
            Self::Best => "best",
            Self::Current => "current",
        };
        format!("{STATE_PREFIX}{group}.{var}")
    }
}

impl TrainCheckpoint {
    /// Stores copies of `values`, the tensors of `group` for the variables `names`
    /// (in the same order).
    pub(crate) fn insert_group(
        &mut self,
        group: StateGroup,
        names: &[String],
        values: &[Tensor],
    ) -> candle::Result<()> {
        for (name, value) in names.iter().zip(values) {
            self.tensors.insert(group.tensor_name(name), value.copy()?);
        }
        Ok(())
    }

    /// The tensors of `group` for the variables `names`, in `dtype` on `device`.
    pub(crate) fn group(
        &self,
        group: StateGroup,
        names: &[String],
        dtype: DType,
        device: &Device,
    ) -> Result<Vec<Tensor>, TrainError> {
        names
            .iter()
            .map(|name| self.tensor(&group.tensor_name(name), dtype, device))
            .collect()
    }

    /// The value training continues from for the variable `var`: the weights the run
    /// stopped at, which a finished run keeps in the state while its model holds the
    /// best weights.
    pub(crate) fn resumed_weight(
        &self,
        var: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, TrainError> {
        let current = StateGroup::Current.tensor_name(var);
        if self.tensors.contains_key(&current) {
            self.tensor(&current, dtype, device)
        } else {
            self.tensor(var, dtype, device)
        }
    }

    /// Makes `best` (one tensor per variable of `names`) the model's weights, moving
    /// the weights it held to the state as the ones training continues from.
    pub(crate) fn keep_best_as_model(
        &mut self,
        names: &[String],
        best: &[Tensor],
    ) -> candle::Result<()> {
        for (name, weights) in names.iter().zip(best) {
            if let Some(current) = self.tensors.insert(name.clone(), weights.copy()?) {
                self.tensors
                    .insert(StateGroup::Current.tensor_name(name), current);
            }
        }
        Ok(())
    }

    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, TrainError> {
        let t = self.tensors.get(name).ok_or_else(|| {
            TrainError::InvalidConfig(format!("the checkpoint has no tensor `{name}`"))
        })?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// A stable 64-bit FNV-1a digest of the data's shape and values (context included).
pub fn fingerprint(data: &Dataset) -> String {
    let mut f = Fingerprint::new(data.dim, data.len());
    f.add_rows(data);
    if data.context_dim > 0 {
        f.start_context(data.context_dim);
        f.add_context(&data.context);
    }
    f.finish()
}

/// [`fingerprint`] computed a block of rows at a time, for data read in blocks: the
/// rows' values in order, then (for a context) the context in order.
#[derive(Debug, Clone)]
pub struct Fingerprint(u64);

impl Fingerprint {
    /// For `rows` rows of `dim` features.
    pub fn new(dim: usize, rows: usize) -> Self {
        let mut f = Self(0xcbf2_9ce4_8422_2325);
        f.eat(&(dim as u64).to_le_bytes());
        f.eat(&(rows as u64).to_le_bytes());
        f
    }

    fn eat(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The next block's values (not its context). Rows held as bytes digest as the
    /// same values in floats.
    pub fn add_rows(&mut self, data: &Dataset) {
        for v in &data.values {
            self.eat(&v.to_bits().to_le_bytes());
        }
        for &b in &data.pixels {
            self.eat(&f32::from(b).to_bits().to_le_bytes());
        }
    }

    /// After every row's values: the context's width.
    pub fn start_context(&mut self, context_dim: usize) {
        self.eat(&(context_dim as u64).to_le_bytes());
    }

    /// The next block's context values.
    pub fn add_context(&mut self, context: &[f32]) {
        for v in context {
            self.eat(&v.to_bits().to_le_bytes());
        }
    }

    pub fn finish(self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TrainState {
        TrainState {
            step: 10,
            adam_step: 9,
            epoch: 2,
            pos: 64,
            best_val_nll: Some(1.5),
            best_step: Some(10),
            since_best: 0,
            last_loss: 1.25,
            skipped: 1,
            elapsed_secs: 0.5,
            data_fingerprint: "00".into(),
            stream: None,
        }
    }

    #[test]
    fn counters_out_of_range_are_refused() {
        assert_eq!(state().validate(), Ok(()));
        assert_eq!(state().check_rows(64), Ok(()));
        let refused = |edit: fn(&mut TrainState)| {
            let mut s = state();
            edit(&mut s);
            s.validate().expect_err("refused")
        };
        assert_eq!(
            refused(|s| s.pos = usize::MAX),
            format!(
                "{} rows into the data (`pos`): more than the limit of {}",
                usize::MAX,
                flow_core::limits::MAX_ROWS
            )
        );
        assert_eq!(
            refused(|s| s.adam_step = 11),
            "`adam_step` is 11, after the 10 steps taken (`step`)"
        );
        assert_eq!(
            refused(|s| s.best_step = Some(12)),
            "`best_step` is 12, after the 10 steps taken (`step`)"
        );
        assert_eq!(
            refused(|s| s.best_step = None),
            "`best_val_nll` and `best_step` must be given together"
        );
        assert_eq!(
            refused(|s| s.elapsed_secs = -1.0),
            "`elapsed_secs` must be a time, got -1"
        );
        assert_eq!(
            state().check_rows(63),
            Err("the training state is at row 64 of the data, which has 63".into())
        );
    }

    #[test]
    fn a_state_before_any_finite_step_reads_back() {
        let state = TrainState {
            step: 0,
            adam_step: 0,
            epoch: 0,
            pos: 0,
            best_val_nll: None,
            best_step: None,
            since_best: 0,
            last_loss: f64::NAN,
            skipped: 3,
            elapsed_secs: 0.5,
            data_fingerprint: "00".into(),
            stream: None,
        };
        let json = serde_json::to_string(&state).expect("json");
        assert!(json.contains(r#""last_loss":null"#), "{json}");
        let back: TrainState = serde_json::from_str(&json).expect("read");
        assert!(back.last_loss.is_nan() && back.skipped == 3);
    }

    #[test]
    fn the_best_weights_become_the_model_and_training_continues_from_the_current(
    ) -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let current = Tensor::new(&[1f32, 2.0], &dev)?;
        let best = Tensor::new(&[3f32, 4.0], &dev)?;
        let mut ck = TrainCheckpoint {
            model: ModelConfig::new(2, Vec::new()),
            config: TrainConfig::default(),
            state: serde_json::from_str(
                r#"{"step":0,"adam_step":0,"epoch":0,"pos":0,"best_val_nll":null,"best_step":null,"since_best":0,"last_loss":null,"skipped":0,"elapsed_secs":0.0,"data_fingerprint":"00"}"#,
            )
            .expect("state"),
            tensors: HashMap::from([("w".to_string(), current.clone())]),
            built: None,
        };
        let names = ["w".to_string()];
        ck.insert_group(StateGroup::AdamM, &names, std::slice::from_ref(&best))?;
        assert_eq!(
            ck.group(StateGroup::AdamM, &names, DType::F64, &dev)?[0].to_vec1::<f64>()?,
            [3.0, 4.0]
        );
        ck.keep_best_as_model(&names, &[best])?;
        let mut keys: Vec<&String> = ck.tensors.keys().collect();
        keys.sort();
        assert_eq!(keys, ["train_state.adam.m.w", "train_state.current.w", "w"]);
        assert_eq!(ck.tensors["w"].to_vec1::<f32>()?, [3.0, 4.0]);
        let resumed = ck.resumed_weight("w", DType::F32, &dev)?;
        assert_eq!(resumed.to_vec1::<f32>()?, [1.0, 2.0]);
        let missing = ck.group(StateGroup::Best, &names, DType::F32, &dev);
        assert_eq!(
            missing.map(|_| ()).map_err(|e| e.to_string()),
            Err(
                "invalid training configuration: the checkpoint has no tensor `train_state.best.w`"
                    .to_string()
            )
        );
        Ok(())
    }
}
