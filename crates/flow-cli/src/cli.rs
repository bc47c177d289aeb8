use std::path::PathBuf;

use clap::{
    builder::{PossibleValue, PossibleValuesParser, TypedValueParser},
    Arg, ArgMatches, Args, FromArgMatches, Parser, Subcommand, ValueEnum,
};
use flow_models::{
    options::{family_defaults, listed, taking},
    Family, OptionKind, Registry, RegistryOption,
};
use flow_nn::Activation;
use flow_train::data::Toy;

use crate::plot::Bounds;

/// A data set `flow data` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataName {
    Toy(Toy),
    Digits,
}

/// The built-in data sets and `digits`.
fn data_name_parser() -> impl TypedValueParser<Value = DataName> {
    let mut names: Vec<&'static str> = Toy::ALL.map(Toy::name).to_vec();
    names.push("digits");
    PossibleValuesParser::new(names).try_map(|s| match Toy::from_name(&s) {
        Some(t) => Ok(DataName::Toy(t)),
        None if s == "digits" => Ok(DataName::Digits),
        None => Err(format!("unknown data set `{s}`")),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    /// The first 1 500 digits.
    Train,
    /// The last 297 digits.
    Test,
    /// All 1 797.
    All,
}

/// The activations, by the names flow-realnvp gives them.
fn activation_parser() -> impl TypedValueParser<Value = Activation> {
    PossibleValuesParser::new(Activation::ALL.map(Activation::name))
        .try_map(|s| s.parse::<Activation>())
}

#[derive(Debug, Parser)]
#[command(
    name = "flow",
    version,
    about = "Normalizing flows: train, sample, evaluate densities"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a built-in 2-D data set to CSV.
    Data(DataArgs),
    /// Train a flow (any family: see `flow train --help`) on data or images; conditional with --context-dim.
    Train(Box<TrainArgs>),
    /// One log p(x) in nats per input row; prints mean log-prob, NLL and bits/dim.
    LogProb(LogProbArgs),
    /// Draw samples from a model.
    Sample(SampleArgs),
    /// Map data to latents: z = f(x).
    Encode(CodecArgs),
    /// Map latents to data: x = f⁻¹(z).
    Decode(CodecArgs),
    /// Summarise a model on one screen (--json: everything in the file).
    Inspect(InspectArgs),
    /// Plot a 2-D model's density (log p(x), with a colour bar), with data points if given.
    Plot(PlotArgs),
    /// Convert another tool's weights (a safetensors state dict) to a model: RealNVP,
    /// spline (NSF) and autoregressive (MAF) flows.
    Import(ImportArgs),
    /// Write a model in another tool's layout.
    Export(ExportArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SourceArg {
    /// The reference RealNVP code (`bijectors.{i}.sig_net` / `mu_net`).
    Seed,
    /// normflows' `NormalizingFlow` of affine couplings, spline couplings,
    /// autoregressive splines or MAF layers, with their permutations.
    Normflows,
    /// nflows' `SimpleRealNVP`, rational-quadratic couplings and MAF.
    Nflows,
    /// zuko's `RealNVP`, `NSF` and `MAF`.
    Zuko,
    /// FrEIA's `SequenceINN` of Glow coupling blocks.
    Freia,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct ImportArgs {
    /// The tool that saved the weights.
    #[arg(long = "from", value_enum)]
    pub from: SourceArg,
    /// The state dict, saved as safetensors.
    #[arg(long)]
    pub input: PathBuf,
    /// The model to write (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Hidden activation, when the source used another than its library's default.
    #[arg(long, value_parser = activation_parser())]
    pub activation: Option<Activation>,
    /// Log-scale clamp (FrEIA's `clamp`, zuko's bound).
    #[arg(long)]
    pub clamp: Option<f64>,
    /// The splines' tail bound, which the weights do not record (default: the source
    /// library's, nflows 1, normflows 3, zuko 5).
    #[arg(long)]
    pub tail_bound: Option<f64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TargetArg {
    /// The reference RealNVP code's state dict.
    Seed,
    /// zuko's `RealNVP`, `NSF` or `MAF` state dict (prints the flow to build).
    Zuko,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The layout to write.
    #[arg(long, value_enum)]
    pub to: TargetArg,
    /// The model to export.
    #[arg(long)]
    pub model: PathBuf,
    /// The safetensors file to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct DataArgs {
    /// The data set: a 2-D generator, or `digits` (scikit-learn's 8×8 digits, rows of
    /// 64 pixel values in 0..=16).
    #[arg(value_parser = data_name_parser())]
    pub name: DataName,
    /// Number of points (2-D generators).
    #[arg(long)]
    pub n: Option<usize>,
    /// Which digits: the first 1 500 (`train`, what `flow train --data digits` uses),
    /// the last 297 (`test`) or all 1 797.
    #[arg(long, value_enum, default_value = "all")]
    pub split: SplitArg,
    /// Noise level (default depends on the data set).
    #[arg(long)]
    pub noise: Option<f64>,
    /// Seed of the generator: the same seed gives the same points [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Add each point's component (moon, circle, arm, …) as a last `label` column, the
    /// condition of a conditional flow (`flow train --context-dim 1`).
    #[arg(long)]
    pub with_labels: bool,
    /// The file to write, in the format its extension names: .csv, .npy (f32, shape
    /// (rows, columns)) or .png (a scatter of the points; the digits as a grid).
    #[arg(long)]
    pub out: PathBuf,
}

/// The families, by the names the registry gives them, each with its summary.
fn family_parser() -> impl TypedValueParser<Value = Family> {
    let values: Vec<PossibleValue> = Registry::builtin()
        .model_families()
        .iter()
        .map(|f| PossibleValue::new(f.name()).help(f.summary()))
        .collect();
    PossibleValuesParser::new(values).try_map(|s| {
        Registry::builtin()
            .model_family(&s)
            .ok_or_else(|| format!("unknown family `{s}`"))
    })
}

/// A model flag's help line: `text`, the families that take it, and each family's
/// default as its declaration gives it.
fn family_help(flag: &str, text: &str) -> String {
    let families = taking(flag);
    let mut line = format!("{text} [{}", listed(&families));
    let defaults = family_defaults(flag);
    if !defaults.is_empty() {
        let parts: Vec<String> = defaults
            .iter()
            .map(|(value, fams)| {
                if fams.len() == families.len() {
                    value.clone()
                } else {
                    format!("{value} for {}", listed(fams))
                }
            })
            .collect();
        line.push_str(&format!("; default {}", parts.join(", ")));
    }
    line.push(']');
    line
}

/// The flag of a family option: its value read as the option's kind declares, its
/// help line derived from the declarations.
fn option_arg(o: &RegistryOption) -> Arg {
    let arg = Arg::new(o.name)
        .long(o.name)
        .value_name(o.name.to_uppercase().replace('-', "_"))
        .help(family_help(o.name, o.help));
    match &o.kind {
        OptionKind::Count { .. } => {
            arg.value_parser(|s: &str| s.parse::<usize>().map(|v| v.to_string()))
        }
        OptionKind::Positive | OptionKind::NonNegative => {
            arg.value_parser(|s: &str| s.parse::<f64>().map(|v| v.to_string()))
        }
        OptionKind::Choice(choices) => {
            let values: Vec<PossibleValue> = choices
                .iter()
                .map(|c| {
                    let value = PossibleValue::new(c.name);
                    if c.help.is_empty() {
                        value
                    } else {
                        value.help(c.help)
                    }
                })
                .collect();
            arg.value_parser(PossibleValuesParser::new(values))
        }
    }
}

/// The families' options as `flow train` flags, one per option the registry's
/// families declare: what the user gave, as `(name, value)` in declaration order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelFlags {
    pub given: Vec<(&'static str, String)>,
}

impl FromArgMatches for ModelFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let given = Registry::builtin()
            .options()
            .into_iter()
            .filter_map(|o| Some((o.name, matches.get_one::<String>(o.name)?.clone())))
            .collect();
        Ok(Self { given })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for ModelFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        Registry::builtin()
            .options()
            .iter()
            .fold(cmd, |cmd, o| cmd.arg(option_arg(o)))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// A run flag's help line, with its default.
fn run_help(text: &str, default: impl std::fmt::Display) -> String {
    format!("{text} [default {default}]")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    /// Adam (Kingma & Ba 2015).
    Adam,
    /// Adamax: Adam with an infinity-norm second moment.
    Adamax,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    /// The same learning rate throughout.
    Constant,
    /// Multiplied by --lr-decay every step.
    Exp,
    /// Cosine decay to zero after --warmup linear warm-up steps.
    Cosine,
}

/// `flow train`'s flags. The model flags (in brackets, the families that take them)
/// and the run flags are `None` unless given: the families' configurations and
/// `TrainConfig` hold the defaults, and a flag only overrides.
#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    /// A built-in data set name (`digits`: the first 1 500 of scikit-learn's 8×8
    /// digits, an image set), or a file: CSV, .npy, or for images also IDX (MNIST's
    /// format, plain or gzipped).
    #[arg(long)]
    pub data: String,
    /// The model file to write, .safetensors (and, with --checkpoint-every, the
    /// checkpoints).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, help = run_help("Points to generate for a built-in 2-D data set", crate::commands::train::DEFAULT_POINTS))]
    pub n: Option<usize>,
    /// Noise of a built-in 2-D data set (default depends on the data set).
    #[arg(long)]
    pub noise: Option<f64>,
    /// Give a built-in data set's points their labels as a last column (see
    /// --context-dim).
    #[arg(long)]
    pub with_labels: bool,
    #[arg(long, help = family_help("context-dim", "Train a conditional flow: the last N columns of every data row are the condition, the others the data (default 0)"))]
    pub context_dim: Option<usize>,
    /// Validation file, scored during training; the best weights are kept (without
    /// it, --val-fraction of the rows are held out to validate on).
    #[arg(long)]
    pub val: Option<PathBuf>,
    #[arg(long, help = run_help("Without --val, the share of the rows held out (seeded by --seed) to validate on: the saved weights are those of the best validation score, and training stops early (--patience); 0 trains on every row", flow_train::TrainConfig::default().val_fraction))]
    pub val_fraction: Option<f64>,
    /// The flow family (default: realnvp; glow for `--data digits`).
    #[arg(long, value_parser = family_parser())]
    pub flow: Option<Family>,
    #[command(flatten)]
    pub model: ModelFlags,
    #[arg(long, help = family_help("image", "Image shape HxWxC of an image flow's data: each row holds C·H·W pixel values in (C, H, W) order; .npy (N, H, W) or (N, C, H, W), IDX files and `digits` bring their own"))]
    pub image: Option<String>,
    #[arg(long, help = family_help("pixel-levels", "Values a pixel takes: pixels are whole numbers in [0, L), and training sees them dequantised, (pixel + u) / L with u ~ U[0, 1) (default: the data set's, 17 for `digits`, else 256)"))]
    pub pixel_levels: Option<u32>,
    #[arg(long, help = family_help("base", "Base distribution: normal (N(0, I)), diag (a trainable diagonal Gaussian) or mixture:K (a trainable mixture of K diagonal Gaussians) (default normal)"))]
    pub base: Option<String>,
    #[arg(long, conflicts_with = "epochs", help = run_help("Optimizer steps at most (training stops earlier when validation stops improving); with --resume, the total to continue to", crate::commands::train::default_duration()))]
    pub steps: Option<usize>,
    /// Passes over the training data, instead of --steps.
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, help = run_help("Samples per optimizer step", crate::commands::train::batch_defaults()))]
    pub batch: Option<usize>,
    /// The optimizer: Adam (with --weight-decay, AdamW), or Adamax (its weight decay an
    /// L2 penalty, as PyTorch's) [default adam].
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerArg>,
    #[arg(long, help = run_help("The optimizer's learning rate", crate::commands::train::lr_defaults()))]
    pub lr: Option<f64>,
    #[arg(long, help = run_help("Per-step exponential decay of the learning rate (with --schedule exp)", crate::commands::train::lr_decay_defaults()))]
    pub lr_decay: Option<f64>,
    /// Learning-rate schedule [default exp].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// Warm-up steps of the cosine schedule [default 0].
    #[arg(long)]
    pub warmup: Option<usize>,
    #[arg(long, help = run_help("Weight decay: decoupled with Adam (AdamW), an L2 penalty with Adamax", crate::commands::train::weight_decay_defaults()))]
    pub weight_decay: Option<f64>,
    /// Rescale gradients whose global L2 norm exceeds this.
    #[arg(long)]
    pub clip_grad: Option<f64>,
    #[arg(long, help = run_help("Seed of initialisation and batch order (and of a built-in data set)", flow_train::TrainConfig::default().seed))]
    pub seed: Option<u64>,
    /// Device: cpu, cuda, cuda:N, metal, metal:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Write one JSON line per progress report to this .jsonl file.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    #[arg(long, help = format!("Score the validation set every this many steps [default: one epoch, the training rows over --batch, kept within {} to {} steps]", flow_train::VAL_EVERY_RANGE.0, flow_train::VAL_EVERY_RANGE.1))]
    pub val_every: Option<usize>,
    #[arg(long, help = run_help("Stop after this many validation scores without improvement; 0 never stops early", crate::commands::train::default_patience()))]
    pub patience: Option<usize>,
    #[arg(long, help = family_help("no-standardize", "Train on the data and the context as they are, without standardising them"))]
    pub no_standardize: bool,
    #[arg(long, value_name = "LOW:HIGH,…", allow_hyphen_values = true, help = family_help("bounds", "The box the data live in, one LOW:HIGH per data column (-inf or inf for an open side): samples stay inside it and log-probs are densities on it; every training row must lie strictly inside"))]
    pub bounds: Option<String>,
    #[arg(long, value_name = "logit|rejection", help = family_help("bounds-by", &format!("How --bounds hold: `logit` (the default), a fixed map from the box in front of the flow, with exact densities; or `rejection`, the flow trained on the data as they are, its draws outside the box rejected and its log-probs divided by its mass inside, estimated from {} draws per context (as sbi does)", flow_core::truncation::ACCEPTANCE_DRAWS)))]
    pub bounds_by: Option<String>,
    /// Every this many steps, write a resumable checkpoint (weights, optimizer state,
    /// position in the data) to --out.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Continue the run saved in this file: a checkpoint, an interrupted run, or a
    /// finished model that `flow train` wrote. Its settings stand: give the same data
    /// flags; model and run flags may only repeat them; --steps or --epochs may grow.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Skip batches whose loss or gradient is NaN or infinite instead of stopping.
    #[arg(long)]
    pub skip_nonfinite: bool,
    /// Stop after this many steps in total and write a resumable checkpoint to --out.
    #[arg(long)]
    pub stop_at: Option<usize>,
    /// Keep memory flat in the model's depth: recompute each layer's input from its
    /// output in the backward pass instead of keeping activations (more compute, the
    /// same gradients up to rounding). May change on --resume.
    #[arg(long)]
    pub low_memory: bool,
    /// Read the training rows from the file a chunk at a time instead of holding them
    /// all: for data larger than memory. Streams .npy and uncompressed IDX files, whose
    /// rows lie at fixed offsets. Each epoch visits the chunks in a seeded order and each
    /// chunk's rows in a seeded order; one chunk is held at a time. A resumed run
    /// streams as it was written.
    #[arg(long)]
    pub stream: bool,
    #[arg(long, help = format!("With --stream: rows per chunk [default {}]", flow_train::data::DEFAULT_CHUNK_ROWS))]
    pub stream_chunk: Option<usize>,
    /// Train on several processes, each on its share of every batch (--batch stays
    /// the whole batch): `mpi` for processes started by mpirun or srun, `nccl` for one
    /// CUDA GPU per process (torchrun, srun). Needs a build with that cargo feature.
    #[arg(long, value_enum)]
    pub distributed: Option<DistributedArg>,
    #[arg(long, help = format!("With --distributed: seconds a process waits for the others before it fails [default {}]", flow_dist::DEFAULT_TIMEOUT_SECS))]
    pub dist_timeout: Option<f64>,
    /// With --distributed: check every N steps that the processes hold the same
    /// weights, failing if not [default: 100 in debug builds, never in release ones].
    #[arg(long)]
    pub dist_check_every: Option<usize>,
}

/// The transport of `flow train --distributed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DistributedArg {
    /// MPI (cargo feature `mpi`): processes on CPUs.
    Mpi,
    /// NCCL (cargo feature `nccl`): one CUDA GPU per process.
    Nccl,
}

#[derive(Debug, Args)]
pub struct LogProbArgs {
    /// The model.
    #[arg(long)]
    pub model: PathBuf,
    /// Data rows (.csv or .npy); for a conditional model the condition fills the last
    /// columns. An image model reads pixel values (.csv, .npy or IDX) and reports
    /// bits/dim on their discrete scale (see --dequantized for continuous rows).
    #[arg(long)]
    pub input: PathBuf,
    /// Image models: the rows are continuous values in [0, 1), the model's own input
    /// space (what other libraries' `log_prob` takes; a pixel p is (p + u) / L there),
    /// scored as they are: log p(x) in nats and bits/dim on that continuous scale,
    /// without dequantisation noise or the −D·ln L of the pixels' discrete scale.
    #[arg(long)]
    pub dequantized: bool,
    /// Seed of an image model's dequantisation noise (default 0): the same seed gives
    /// the same numbers; average over seeds for a less noisy bits/dim.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write the per-row log-probs here: .csv (one `log_prob` column) or .npy (f32,
    /// shape (rows,)); for an image model the dequantised log-likelihood of the pixels
    /// in nats (with --dequantized, log p(x) of the continuous rows).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Device: cpu, cuda, cuda:N, metal, metal:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct SampleArgs {
    /// The model.
    #[arg(long)]
    pub model: PathBuf,
    /// Number of samples; with --context-file, samples per condition row, each tagged
    /// with its row's index (from 0) in a first `row` column (default: one per row,
    /// untagged).
    #[arg(long)]
    pub n: Option<usize>,
    /// Seed of the draws: the same seed gives the same samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Spread of the base distribution's draws (below 1 concentrates on the modes).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Condition of a conditional model for every sample, as comma-separated values.
    #[arg(long, conflicts_with = "context_file", allow_hyphen_values = true)]
    pub context: Option<String>,
    /// Conditions of a conditional model, one per row (.csv or .npy): one sample per
    /// row, or --n per row.
    #[arg(long)]
    pub context_file: Option<PathBuf>,
    /// The file to write, in the format its extension names: .csv (headed by the
    /// training file's column names), .npy (f32, shape (samples, columns)) or .png (a
    /// scatter of a 2-D model's samples, a grid of an image model's). A conditional
    /// model's condition follows in the last columns, as `flow log-prob` reads it; an
    /// image model writes pixel values.
    #[arg(long)]
    pub out: PathBuf,
    /// Also draw the samples (2-D models) to this PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// The plotted range of a 2-D picture (--plot, or --out FILE.png): the same range
    /// makes pictures comparable (default: the samples' middle 99%, with a margin).
    #[arg(long, value_name = "XMIN,XMAX,YMIN,YMAX", value_parser = Bounds::parse, allow_hyphen_values = true)]
    pub range: Option<Bounds>,
    /// Device: cpu, cuda, cuda:N, metal, metal:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct CodecArgs {
    /// The model.
    #[arg(long)]
    pub model: PathBuf,
    /// Rows to map (.csv or .npy); for a conditional model the condition fills the last
    /// columns. An image model's data rows are continuous values in its input space
    /// [0, 1), not pixel values (see --dequantized).
    #[arg(long)]
    pub input: PathBuf,
    /// The file to write: .csv or .npy (f32, shape (rows, columns)); a conditional
    /// model's condition follows in the last columns.
    #[arg(long)]
    pub out: PathBuf,
    /// Image models: the data side (what encode reads, what decode writes) is
    /// continuous values in [0, 1), the space `flow log-prob --dequantized` scores;
    /// every value is checked to lie there.
    #[arg(long)]
    pub dequantized: bool,
    /// Device: cpu, cuda, cuda:N, metal, metal:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The model.
    #[arg(long)]
    pub model: PathBuf,
    /// Print everything as JSON: the full configuration, the training summary, the
    /// other metadata and every tensor's dtype and shape.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct PlotArgs {
    /// The model (2-D).
    #[arg(long)]
    pub model: PathBuf,
    /// The PNG file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Data points to draw over the density.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Condition of a conditional model, as comma-separated values.
    #[arg(long, allow_hyphen_values = true)]
    pub context: Option<String>,
    /// The plotted range: the same range makes plots comparable, say of two conditions
    /// (default: the middle 99% of the data, or of the model's samples, with a margin).
    #[arg(long, value_name = "XMIN,XMAX,YMIN,YMAX", value_parser = Bounds::parse, allow_hyphen_values = true)]
    pub range: Option<Bounds>,
    /// Device: cpu, cuda, cuda:N, metal, metal:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_option_is_a_flag_with_its_families_and_defaults() {
        let cmd = <ModelFlags as Args>::augment_args(clap::Command::new("train"));
        for option in Registry::builtin().options() {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(option.name))
                .unwrap_or_else(|| panic!("no --{}", option.name));
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(help.starts_with(option.help), "{help}");
            assert!(help.contains(&listed(&taking(option.name))), "{help}");
        }
        let help = family_help("bins", "Spline bins");
        assert_eq!(help, "Spline bins [nsf and nsf-ar; default 8]");
    }
}
