use std::path::PathBuf;

use clap::{
    builder::{PossibleValuesParser, TypedValueParser},
    Args, Parser, Subcommand, ValueEnum,
};
use flow_realnvp::Activation;
use flow_train::data::Toy;

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
    /// Train a flow (RealNVP, NICE, NSF, NSF-AR, MAF or IAF) on a data set; conditional with --context-dim.
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
    /// The model to write.
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
    /// Seed of the generator: the same seed gives the same points.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Add each point's component (moon, circle, arm, …) as a last `label` column, the
    /// condition of a conditional flow (`flow train --context-dim 1`).
    #[arg(long)]
    pub with_labels: bool,
    /// The file to write, in the format its extension names: .csv, .npy (f32, shape
    /// (rows, columns)) or .png (a scatter of the points; the digits as a grid).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CouplingArg {
    /// RealNVP: scale and shift.
    Affine,
    /// NICE: shift only (volume preserving).
    Additive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlowArg {
    /// Affine couplings (the default).
    Realnvp,
    /// Additive couplings.
    Nice,
    /// Rational-quadratic spline couplings.
    Nsf,
    /// Autoregressive rational-quadratic splines.
    NsfAr,
    /// Masked autoregressive flow.
    Maf,
    /// Inverse autoregressive flow.
    Iaf,
    /// Glow (Kingma & Dhariwal 2018): multi-scale, each step ActNorm, an invertible
    /// 1×1 convolution and a convolutional affine coupling (images).
    Glow,
    /// RealNVP's multi-scale image architecture (Dinh et al. 2016): checkerboard and
    /// channel-wise convolutional couplings with batch norm (images).
    RealnvpImage,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OrderArg {
    /// Alternate forward and reversed.
    Alternate,
    /// A seeded random permutation per layer.
    Random,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NetsArg {
    /// One network per parameter.
    Separate,
    /// One network for all parameters.
    Joint,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScaleArg {
    /// `s / (1 + |s| / clamp)`.
    SoftClamp,
    /// `s` unbounded (the original RealNVP).
    Exp,
    /// `clamp · tanh(s / clamp)`.
    Tanh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    /// Adam (Kingma & Ba 2015).
    Adam,
    /// Adamax: Adam with an infinity-norm second moment.
    Adamax,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    /// The same learning rate throughout.
    Constant,
    /// Multiplied by --lr-decay every step.
    Exp,
    /// Cosine decay to zero after --warmup linear warm-up steps.
    Cosine,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    /// A built-in data set name (`digits`: the first 1 500 of scikit-learn's 8×8
    /// digits, an image set), or a file: CSV, .npy, or for images also IDX (MNIST's
    /// format, plain or gzipped).
    #[arg(long)]
    pub data: String,
    /// The model file to write (and, with --checkpoint-every, the checkpoints).
    #[arg(long)]
    pub out: PathBuf,
    /// Points to generate for a built-in data set.
    #[arg(long, default_value_t = 20_000)]
    pub n: usize,
    /// Noise of a built-in data set (default depends on the data set).
    #[arg(long)]
    pub noise: Option<f64>,
    /// Give a built-in data set's points their labels as a last column (see
    /// --context-dim).
    #[arg(long)]
    pub with_labels: bool,
    /// Train a conditional flow: the last N columns of every data row are the
    /// condition, the others the data.
    #[arg(long, default_value_t = 0)]
    pub context_dim: usize,
    /// Validation file, scored during training; the best weights are kept.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// The flow family: RealNVP, NICE, spline coupling (NSF), autoregressive spline
    /// (NSF-AR), masked autoregressive (MAF) or inverse autoregressive (IAF).
    #[arg(long, value_enum, default_value = "realnvp")]
    pub flow: FlowArg,
    /// Layers (couplings or autoregressive layers).
    #[arg(long, default_value_t = 5)]
    pub layers: usize,
    /// Image shape HxWxC of an image flow's data: each row holds C·H·W pixel values in
    /// (C, H, W) order. .npy (N, H, W) or (N, C, H, W), IDX files and `digits` bring
    /// their own.
    #[arg(long)]
    pub image: Option<String>,
    /// Values a pixel takes (image flows): pixels are whole numbers in [0, L), and
    /// training sees them dequantised, (pixel + u) / L with u ~ U[0, 1) (default: 256;
    /// 17 for `digits`).
    #[arg(long)]
    pub pixel_levels: Option<u32>,
    /// Scales (levels) of an image flow; each squeezes once and all but the last
    /// factor half the channels out.
    #[arg(long, default_value_t = 2)]
    pub scales: usize,
    /// Flow steps per scale of Glow (K).
    #[arg(long, default_value_t = 8)]
    pub depth: usize,
    /// Hidden channels of an image flow's convolutional conditioners.
    #[arg(long, default_value_t = 64)]
    pub channels: usize,
    /// Width of each hidden layer of the conditioner networks (default: 512; MAF and
    /// IAF 64).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Hidden layers of each conditioner network (default: 1; MAF and IAF 2).
    #[arg(long)]
    pub hidden_layers: Option<usize>,
    /// Hidden-layer activation of the conditioner networks (default: leaky-relu for
    /// RealNVP and NICE, relu for the others).
    #[arg(long, value_parser = activation_parser())]
    pub activation: Option<Activation>,
    /// Spline bins (NSF, NSF-AR).
    #[arg(long, default_value_t = flow_nsf::DEFAULT_BINS)]
    pub bins: usize,
    /// Splines act on [−B, B] and are the identity outside (NSF, NSF-AR).
    #[arg(long, default_value_t = flow_nsf::DEFAULT_TAIL_BOUND)]
    pub tail_bound: f64,
    /// Feature orders of autoregressive layers: alternating, or a seeded random
    /// permutation per layer (NSF-AR, MAF, IAF).
    #[arg(long, value_enum, default_value = "alternate")]
    pub order: OrderArg,
    /// Base distribution: normal (N(0, I)), diag (a trainable diagonal Gaussian) or
    /// mixture:K (a trainable mixture of K diagonal Gaussians).
    #[arg(long, default_value = "normal")]
    pub base: String,
    /// Coupling layer: affine (RealNVP) or additive (NICE).
    #[arg(long, value_enum, default_value = "affine")]
    pub coupling: CouplingArg,
    /// How an affine coupling's raw log-scale is bounded.
    #[arg(long, value_enum, default_value = "soft-clamp")]
    pub scale: ScaleArg,
    /// Conditioner networks: one per parameter (scale and shift: the original RealNVP)
    /// or one joint network for both (zuko's and normflows' layout, half the arithmetic).
    #[arg(long, value_enum, default_value = "separate")]
    pub nets: NetsArg,
    /// Bound of the soft-clamp and tanh log-scale maps.
    #[arg(long, default_value_t = 3.0)]
    pub clamp: f64,
    /// Optimizer steps (default 1000); with --resume, the total to continue to.
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Passes over the training data, instead of --steps.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    /// The optimizer: Adam (with --weight-decay, AdamW), or Adamax (its weight decay an
    /// L2 penalty, as PyTorch's).
    #[arg(long, value_enum, default_value = "adam")]
    pub optimizer: OptimizerArg,
    /// The optimizer's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Per-step exponential decay of the learning rate (with `--schedule exp`).
    #[arg(long, default_value_t = 0.999)]
    pub lr_decay: f64,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value = "exp")]
    pub schedule: ScheduleArg,
    /// Warm-up steps of the cosine schedule.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Weight decay: decoupled with Adam (AdamW), an L2 penalty with Adamax (default:
    /// none; 0.1 for Glow).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Rescale gradients whose global L2 norm exceeds this.
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Seed of initialisation and batch order (and of a built-in data set).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu, cuda, cuda:N, metal, metal:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Write one JSON line per progress report here.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Score the validation file every this many steps.
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
    /// Continue the run saved in this file: a checkpoint, an interrupted run, or a
    /// finished model that `flow train` wrote (its settings are used; give the same data
    /// flags, and a larger --steps to go on past its end).
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
    /// The model.
    #[arg(long)]
    pub model: PathBuf,
    /// Data rows (.csv or .npy); for a conditional model the condition fills the last
    /// columns. An image model reads pixel values (.csv, .npy or IDX) and reports
    /// bits/dim on their discrete scale.
    #[arg(long)]
    pub input: PathBuf,
    /// Seed of an image model's dequantisation noise: the same seed gives the same
    /// numbers; average over seeds for a less noisy bits/dim.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the per-row log-probs here: .csv (one `log_prob` column) or .npy (f32,
    /// shape (rows,)); for an image model the dequantised log-likelihood of the pixels
    /// in nats.
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
    /// columns.
    #[arg(long)]
    pub input: PathBuf,
    /// The file to write: .csv or .npy (f32, shape (rows, columns)); a conditional
    /// model's condition follows in the last columns.
    #[arg(long)]
    pub out: PathBuf,
    /// Device: cpu, cuda, cuda:N, metal, metal:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The model.
    #[arg(long)]
    pub model: PathBuf,
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
    /// Device: cpu, cuda, cuda:N, metal, metal:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}
