// CUDA kernels around the products of a same-padded stride-1 convolution, the GPU
// counterpart of the CPU op in mod.rs. Compiled to PTX by build.rs when the `cuda`
// feature is on; the products themselves are cuBLAS calls (cuda.rs).
//
// Images are (batch, c, h, w), channel-major as candle holds them. Inside the op the
// work is position-major, as on the CPU: the patch matrix `cols` has one row per output
// position (batch·h·w rows) of c·k·k values ordered as the weight's (c, ky, kx), and a
// position-major output is (batch·h·w, c_out). Every kernel runs one thread per element
// it writes, with no other writer, so results do not depend on scheduling.
//
// The activation is coded as `kind`: 0 none, 1 ReLU with slope `slope` below zero
// (0 for ReLU, leaky ReLU's slope otherwise), 2 tanh. Its derivative is taken from the
// output y = act(z): ReLU's is 1 where y > 0 and `slope` elsewhere, tanh's 1 − y².

template <typename T>
__device__ __forceinline__ T conv_activate(T z, int kind, T slope) {
    switch (kind) {
    case 1: return z > T(0) ? z : slope * z;
    case 2: return tanh(z);
    default: return z;
    }
}

template <typename T>
__device__ __forceinline__ T conv_slope(T y, int kind, T slope) {
    switch (kind) {
    case 1: return y > T(0) ? T(1) : slope;
    case 2: return T(1) - y * y;
    default: return T(1);
    }
}

__device__ __forceinline__ long long conv_thread() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// cols (batch·h·w, c·k·k) from x (batch, c, h, w), zero where a tap falls outside.
template <typename T>
__device__ __forceinline__ void conv_im2col(const T *x, T *cols, int batch, int c, int h,
                                            int w, int k) {
    const long long kk = static_cast<long long>(k) * k, patch = c * kk;
    const long long hw = static_cast<long long>(h) * w;
    const long long i = conv_thread();
    if (i >= static_cast<long long>(batch) * hw * patch) {
        return;
    }
    const long long pos = i / patch;
    const long long r = i - pos * patch;
    const long long ci = r / kk;
    const int tap = static_cast<int>(r - ci * kk);
    const long long b = pos / hw;
    const int pix = static_cast<int>(pos - b * hw);
    const int yy = pix / w + tap / k - k / 2;
    const int xx = pix % w + tap % k - k / 2;
    const bool inside = yy >= 0 && yy < h && xx >= 0 && xx < w;
    cols[i] = inside ? x[((b * c + ci) * h + yy) * w + xx] : T(0);
}

// x's gradient (batch, c, h, w) from the patch matrix's, cols (batch·h·w, c·k·k): each
// pixel gathers the k·k taps that read it.
template <typename T>
__device__ __forceinline__ void conv_col2im(const T *cols, T *x, int batch, int c, int h,
                                            int w, int k) {
    const long long kk = static_cast<long long>(k) * k, patch = c * kk;
    const long long hw = static_cast<long long>(h) * w;
    const long long i = conv_thread();
    if (i >= static_cast<long long>(batch) * c * hw) {
        return;
    }
    const long long plane = i / hw;
    const int pix = static_cast<int>(i - plane * hw);
    const long long b = plane / c, ci = plane - b * c;
    const int yy = pix / w, xx = pix % w, p = k / 2;
    T sum = T(0);
    for (int ky = 0; ky < k; ++ky) {
        const int oy = yy - ky + p;
        if (oy < 0 || oy >= h) {
            continue;
        }
        for (int kx = 0; kx < k; ++kx) {
            const int ox = xx - kx + p;
            if (ox < 0 || ox >= w) {
                continue;
            }
            const long long pos = b * hw + static_cast<long long>(oy) * w + ox;
            sum += cols[pos * patch + ci * kk + ky * k + kx];
        }
    }
    x[i] = sum;
}

// y (batch, c, h, w) = act(z + bias) from the position-major z (batch·h·w, c); `bias`
// may be null.
template <typename T>
__device__ __forceinline__ void conv_epilogue(const T *z, const T *bias, T *y, int batch,
                                              int c, long long hw, int kind, double slope) {
    const long long i = conv_thread();
    if (i >= static_cast<long long>(batch) * c * hw) {
        return;
    }
    const long long plane = i / hw, pix = i - plane * hw;
    const long long b = plane / c, co = plane - b * c;
    T v = z[(b * hw + pix) * c + co];
    if (bias) {
        v += bias[co];
    }
    y[i] = conv_activate<T>(v, kind, T(slope));
}

// The gradient before the activation, g ⊙ act'(z), from the output's gradient g and
// the output y, both (batch, c, h, w).
template <typename T>
__device__ __forceinline__ void conv_activation_grad(const T *g, const T *y, T *out,
                                                     long long n, int kind, double slope) {
    const long long i = conv_thread();
    if (i >= n) {
        return;
    }
    out[i] = g[i] * conv_slope<T>(y[i], kind, T(slope));
}

// Position-major (batch·h·w, c) from channel-major (batch, c, h, w).
template <typename T>
__device__ __forceinline__ void conv_to_positions(const T *x, T *out, int batch, int c,
                                                  long long hw) {
    const long long i = conv_thread();
    if (i >= static_cast<long long>(batch) * c * hw) {
        return;
    }
    const long long pos = i / c, ci = i - pos * c;
    const long long b = pos / hw, pix = pos - b * hw;
    out[i] = x[(b * c + ci) * hw + pix];
}

// The bias's gradient (c): the sum of each column of the position-major dz (rows, c),
// in two passes with a fixed order of addition, so that it does not depend on the
// scheduling. First one thread per (slice of `slice` rows, channel) sums its slice,
// neighbouring threads reading neighbouring channels of a row; then one thread per
// channel adds its slices' sums in order.
template <typename T>
__device__ __forceinline__ void conv_bias_partials(const T *dz, T *partials, long long rows,
                                                   int c, int slice) {
    const long long t = conv_thread();
    const long long slices = (rows + slice - 1) / slice;
    if (t >= slices * c) {
        return;
    }
    const long long s = t / c, co = t - s * c;
    const long long end = (s + 1) * slice < rows ? (s + 1) * slice : rows;
    T sum = T(0);
    for (long long r = s * slice; r < end; ++r) {
        sum += dz[r * c + co];
    }
    partials[t] = sum;
}

template <typename T>
__device__ __forceinline__ void conv_bias_finish(const T *partials, T *out, long long slices,
                                                 int c) {
    const long long co = conv_thread();
    if (co >= c) {
        return;
    }
    T sum = T(0);
    for (long long s = 0; s < slices; ++s) {
        sum += partials[s * c + co];
    }
    out[co] = sum;
}

#define CONV_KERNELS(T, SUFFIX)                                                           \
    extern "C" __global__ void conv_im2col_##SUFFIX(const T *x, T *cols, int batch, int c, \
                                                    int h, int w, int k) {                 \
        conv_im2col<T>(x, cols, batch, c, h, w, k);                                        \
    }                                                                                      \
    extern "C" __global__ void conv_col2im_##SUFFIX(const T *cols, T *x, int batch, int c, \
                                                    int h, int w, int k) {                 \
        conv_col2im<T>(cols, x, batch, c, h, w, k);                                        \
    }                                                                                      \
    extern "C" __global__ void conv_epilogue_##SUFFIX(const T *z, const T *bias, T *y,     \
                                                      int batch, int c, long long hw,      \
                                                      int kind, double slope) {            \
        conv_epilogue<T>(z, bias, y, batch, c, hw, kind, slope);                           \
    }                                                                                      \
    extern "C" __global__ void conv_activation_grad_##SUFFIX(                              \
        const T *g, const T *y, T *out, long long n, int kind, double slope) {             \
        conv_activation_grad<T>(g, y, out, n, kind, slope);                                \
    }                                                                                      \
    extern "C" __global__ void conv_to_positions_##SUFFIX(const T *x, T *out, int batch,   \
                                                          int c, long long hw) {           \
        conv_to_positions<T>(x, out, batch, c, hw);                                        \
    }                                                                                      \
    extern "C" __global__ void conv_bias_partials_##SUFFIX(const T *dz, T *partials,       \
                                                           long long rows, int c,          \
                                                           int slice) {                    \
        conv_bias_partials<T>(dz, partials, rows, c, slice);                               \
    }                                                                                      \
    extern "C" __global__ void conv_bias_finish_##SUFFIX(const T *partials, T *out,        \
                                                         long long slices, int c) {        \
        conv_bias_finish<T>(partials, out, slices, c);                                     \
    }

CONV_KERNELS(float, f32)
CONV_KERNELS(double, f64)
