//! Upper bounds on sizes read from flags and files, checked before anything is
//! allocated: a size beyond its bound is a mistake or a hostile input, and refusing it
//! with a message beats an allocator abort. Each bound is far above any model or data
//! set these crates are meant for, and low enough that one buffer of that many `f32`
//! values, or one weight matrix at that size, still fits in memory.

/// Most features per row (the dim of a model, the pixels of an image, C·H·W):
/// 2^26 features, one row of 256 MiB in `f32`; a 4096×4096 image with 4 channels fits.
pub const MAX_DIM: usize = 1 << 26;

/// Widest hidden layer of a conditioner network: a square layer of 16384 units holds
/// 2^28 weights (1 GiB in `f32`), far wider than published flows use (≤ 4096).
pub const MAX_HIDDEN: usize = 1 << 14;

/// Most components of a mixture base: each is a Gaussian over every feature, so
/// 4096 components over a wide row already hold more parameters than the flow.
pub const MAX_COMPONENTS: usize = 1 << 12;

/// Most bins of a rational-quadratic spline: the minimum bin width (1e-3 of the
/// interval) already rules out 1000 or more; libraries use 4 to 64.
pub const MAX_BINS: usize = 1 << 10;

/// Most layers of a stack (coupling or autoregressive layers, flow steps per level,
/// image scales): every layer keeps activations for the backward pass, and 1024 is
/// far deeper than any flow trained in practice (Glow uses 32 per level).
pub const MAX_LAYERS: usize = 1 << 10;

/// Most hidden channels of a convolutional conditioner: a 3×3 convolution at 4096
/// channels already holds 151 million weights.
pub const MAX_CHANNELS: usize = 1 << 12;

/// Most rows generated or drawn at once (a built-in data set's points, a batch):
/// 2^24 rows of a few features stay within a few hundred MiB.
pub const MAX_ROWS: usize = 1 << 24;
