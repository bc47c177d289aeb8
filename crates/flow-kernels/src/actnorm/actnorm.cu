// CUDA kernels of activation normalisation, the GPU counterpart of the CPU op in
// mod.rs: a per-channel affine map of images (batch, c, hw) and its backward. Compiled
// to PTX by build.rs when the `cuda` feature is on.
//
// With e = exp(s[c]) forward and exp(−s[c]) inverse:
//   forward  y = (x + b)·e,  ∂x = g·e,  ∂b = e·Σ g,  ∂s = Σ g·y;
//   inverse  y = x·e − b,    ∂x = g·e,  ∂b = −Σ g,  ∂s = −e·Σ g·x.
// The backward takes `v`, the output y forward and the input x inverse, so that both
// directions need the same two sums per channel, Σ g and Σ g·v. Each sum is taken in a
// fixed order (per thread, then per warp by shuffles, then the warps' partials by one
// warp per channel), so results do not depend on scheduling.

#define ACTNORM_WARP 32

template <typename T>
__device__ __forceinline__ T actnorm_warp_sum(T v) {
    for (int offset = ACTNORM_WARP / 2; offset > 0; offset /= 2) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    return v;
}

// y from x, one thread per element.
template <typename T>
__device__ __forceinline__ void actnorm_apply(const T *x, const T *b, const T *s, T *y,
                                              long long n, int c, long long hw, int inverse) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    const int ch = static_cast<int>((i / hw) % c);
    y[i] = inverse ? x[i] * exp(-s[ch]) - b[ch] : (x[i] + b[ch]) * exp(s[ch]);
}

// ∂x into `dx`, and per warp the partial sums (Σ g, Σ g·v) of its channel into
// `partial` (c, warps per channel, 2). Grid (c, blocks per channel): the threads of a
// channel's blocks stride over its batch·hw elements.
template <typename T>
__device__ __forceinline__ void actnorm_partials(const T *g, const T *v, const T *s, T *dx,
                                                 T *partial, int batch, int c, long long hw,
                                                 int inverse) {
    const int ch = blockIdx.x;
    const long long per = static_cast<long long>(batch) * hw;
    const long long lanes = static_cast<long long>(gridDim.y) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.y) * blockDim.x + threadIdx.x;
    const T e = exp(inverse ? -s[ch] : s[ch]);
    T sum_g = T(0), sum_gv = T(0);
    for (long long j = first; j < per; j += lanes) {
        const long long img = j / hw;
        const long long i = (img * c + ch) * hw + (j - img * hw);
        const T gi = g[i];
        dx[i] = gi * e;
        sum_g += gi;
        sum_gv += gi * v[i];
    }
    sum_g = actnorm_warp_sum(sum_g);
    sum_gv = actnorm_warp_sum(sum_gv);
    if (threadIdx.x % ACTNORM_WARP == 0) {
        const long long at = (ch * (lanes / ACTNORM_WARP) + first / ACTNORM_WARP) * 2;
        partial[at] = sum_g;
        partial[at + 1] = sum_gv;
    }
}

// [∂b | ∂s] (2c) into `sums` from the partials, one warp per channel (grid c, block
// one warp).
template <typename T>
__device__ __forceinline__ void actnorm_finish(const T *partial, const T *s, T *sums, int c,
                                               int warps, int inverse) {
    const int ch = blockIdx.x, lane = threadIdx.x;
    T sum_g = T(0), sum_gv = T(0);
    for (int w = lane; w < warps; w += ACTNORM_WARP) {
        const long long at = (static_cast<long long>(ch) * warps + w) * 2;
        sum_g += partial[at];
        sum_gv += partial[at + 1];
    }
    sum_g = actnorm_warp_sum(sum_g);
    sum_gv = actnorm_warp_sum(sum_gv);
    if (lane == 0) {
        if (inverse) {
            sums[ch] = -sum_g;
            sums[c + ch] = -exp(-s[ch]) * sum_gv;
        } else {
            sums[ch] = exp(s[ch]) * sum_g;
            sums[c + ch] = sum_gv;
        }
    }
}

#define ACTNORM_KERNELS(T, SUFFIX)                                                         \
    extern "C" __global__ void actnorm_apply_##SUFFIX(const T *x, const T *b, const T *s,  \
                                                      T *y, long long n, int c,            \
                                                      long long hw, int inverse) {         \
        actnorm_apply<T>(x, b, s, y, n, c, hw, inverse);                                   \
    }                                                                                      \
    extern "C" __global__ void actnorm_partials_##SUFFIX(const T *g, const T *v,           \
                                                         const T *s, T *dx, T *partial,    \
                                                         int batch, int c, long long hw,   \
                                                         int inverse) {                    \
        actnorm_partials<T>(g, v, s, dx, partial, batch, c, hw, inverse);                  \
    }                                                                                      \
    extern "C" __global__ void actnorm_finish_##SUFFIX(const T *partial, const T *s,       \
                                                       T *sums, int c, int warps,          \
                                                       int inverse) {                      \
        actnorm_finish<T>(partial, s, sums, c, warps, inverse);                            \
    }

ACTNORM_KERNELS(float, f32)
ACTNORM_KERNELS(double, f64)
