// Shared by the crate and by build.rs (which passes it to nvcc), so that the CUDA
// kernels and the code that launches them agree.

/// Most inputs or outputs a network may have for the fused CUDA kernels: the kernels
/// keep a sample's inputs and outputs in registers.
pub const CUDA_MAX_IO: usize = 16;

/// Most bins a spline may have for the fused CUDA kernel: a thread keeps one element's
/// knots in local arrays.
pub const CUDA_MAX_BINS: usize = 64;
