use std::path::PathBuf;

use clap::{
    builder::{PossibleValuesParser, TypedValueParser},
    Args, Parser, Subcommand, ValueEnum,
};
use flow_realnvp::Activation;
use flow_train::data::Toy;

/// The built-in data sets, by the names flow-train gives them.
fn toy_parser() -> impl TypedValueParser<Value = Toy> {
    PossibleValuesParser::new(Toy::ALL.map(Toy::name))
        .try_map(|s| Toy::from_name(&s).ok_or_else(|| format!("unknown data set `{s}`")))
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
    /// Train a RealNVP model.
    Train(Box<TrainArgs>),
    /// One log p(x) in nats per input row; prints mean log-prob, NLL and bits/dim.
    LogProb(LogProbArgs),
    /// Draw samples from a model.
    Sample(SampleArgs),
    /// Map data to latents: z = f(x).
    Encode(CodecArgs),
    /// Map latents to data: x = f⁻¹(z).
    Decode(CodecArgs),
    /// Show a model's configuration, parameter count and tensors.
    Inspect(InspectArgs),
    /// Plot a 2-D model's density, with data points if given.
    Plot(PlotArgs),
    /// Convert another tool's RealNVP weights (a safetensors state dict) to a model.
    Import(ImportArgs),
    /// Write a model in another tool's layout.
    Export(ExportArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SourceArg {
    Seed,
    Normflows,
    Nflows,
    Zuko,
    Freia,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct ImportArgs {
    #[arg(long = "from", value_enum)]
    pub from: SourceArg,
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Hidden activation, when the source used another than its library's default.
    #[arg(long, value_parser = activation_parser())]
    pub activation: Option<Activation>,
    /// Log-scale clamp (FrEIA's `clamp`, zuko's bound).
    #[arg(long)]
    pub clamp: Option<f64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TargetArg {
    Seed,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long, value_enum)]
    pub to: TargetArg,
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct DataArgs {
    #[arg(value_parser = toy_parser())]
    pub name: Toy,
    #[arg(long)]
    pub n: usize,
    /// Noise level (default depends on the data set).
    #[arg(long)]
    pub noise: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CouplingArg {
    Affine,
    Additive,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScaleArg {
    SoftClamp,
    Exp,
    Tanh,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    Constant,
    Exp,
    Cosine,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    /// A built-in data set name, or a CSV / .npy file.
    #[arg(long)]
    pub data: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Points to generate for a built-in data set.
    #[arg(long, default_value_t = 20_000)]
    pub n: usize,
    #[arg(long)]
    pub noise: Option<f64>,
    /// Validation file, scored during training; the best weights are kept.
    #[arg(long)]
    pub val: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    pub layers: usize,
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    #[arg(long, default_value_t = 1)]
    pub hidden_layers: usize,
    #[arg(long, value_parser = activation_parser(), default_value = "leaky-relu")]
    pub activation: Activation,
    #[arg(long, value_enum, default_value = "affine")]
    pub coupling: CouplingArg,
    #[arg(long, value_enum, default_value = "soft-clamp")]
    pub scale: ScaleArg,
    /// Bound of the soft-clamp and tanh log-scale maps.
    #[arg(long, default_value_t = 3.0)]
    pub clamp: f64,
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Per-step exponential decay of the learning rate (with `--schedule exp`).
    #[arg(long, default_value_t = 0.999)]
    pub lr_decay: f64,
    #[arg(long, value_enum, default_value = "exp")]
    pub schedule: ScheduleArg,
    /// Warm-up steps of the cosine schedule.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Use AdamW with this decoupled weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub clip_grad: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Write one JSON line per progress report here.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub val_every: usize,
    /// Stop after this many validation scores without improvement.
    #[arg(long)]
    pub patience: Option<usize>,
    /// Train on the data as it is, without standardising it.
    #[arg(long)]
    pub no_standardize: bool,
    /// Every this many steps, write a resumable checkpoint (weights, optimizer state,
    /// position in the data) to --out.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Continue the run saved in this checkpoint (its settings are used; give the same
    /// data flags).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Skip batches whose loss or gradient is NaN or infinite instead of stopping.
    #[arg(long)]
    pub skip_nonfinite: bool,
    /// Stop after this many steps in total and write a resumable checkpoint to --out.
    #[arg(long)]
    pub stop_at: Option<usize>,
}

#[derive(Debug, Args)]
pub struct LogProbArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub input: PathBuf,
    /// Write the per-row log-probs here (CSV).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct SampleArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long)]
    pub out: PathBuf,
    /// Also draw the samples (2-D models) to this PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct CodecArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[arg(long)]
    pub model: PathBuf,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Data points to draw over the density.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}
