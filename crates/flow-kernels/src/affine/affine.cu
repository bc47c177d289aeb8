// CUDA kernels for the element-wise part of an affine coupling, the GPU counterpart
// of the CPU kernels in mod.rs, term for term. Compiled to PTX by build.rs when the
// `cuda` feature is on.
//
// x and y are (batch, dim); s and t (batch, n), the conditioner's raw log-scales and
// shifts for the n transformed features. column[d] is the column of s and t that
// feature d takes, or -1 for a feature copied through. The update kernels run one
// thread per element of y, the log-det kernel one thread per row, its gradient one
// per element of s: every output element has one writer, so results do not depend on
// scheduling.
//
// `shift_first` picks where the shift sits: 0 is y = x·exp(ŝ) + t (RealNVP), 1 is
// y = (x + t)·exp(ŝ) (Glow as normflows writes it), each with its inverse.
//
// The scale map (ScaleMap in scale.rs) turns a raw s into the log-scale ŝ: kind 0 is
// ŝ = s, 1 s / (1 + |s|/c), 2 c·tanh(s/c), 3 0.636·c·atan(s), 4 log(sigmoid(s + 2) +
// 1e-3), 5 log(softplus(s) + 1e-3).

template <typename T>
__device__ __forceinline__ T scale_map(T s, int kind, T c, T *slope) {
    const T one = T(1);
    switch (kind) {
    case 1: {
        const T d = one + (s < T(0) ? -s : s) / c;
        *slope = one / (d * d);
        return s / d;
    }
    case 2: {
        const T y = tanh(s / c);
        *slope = one - y * y;
        return c * y;
    }
    case 3: {
        const T k = c * T(0.636);
        *slope = k / (one + s * s);
        return k * atan(s);
    }
    case 4: {
        const T p = one / (one + exp(-(s + T(2))));
        const T q = p + T(1e-3);
        *slope = p * (one - p) / q;
        return log(q);
    }
    case 5: {
        const T abs_s = s < T(0) ? -s : s;
        const T softplus = (s > T(0) ? s : T(0)) + log1p(exp(-abs_s));
        const T q = softplus + T(1e-3);
        *slope = one / (one + exp(-s)) / q;
        return log(q);
    }
    default:
        *slope = one;
        return s;
    }
}

// y = x with each transformed feature x·exp(ŝ) + t, or (inverse) (x − t)·exp(−ŝ);
// with `shift_first`, (x + t)·exp(ŝ), or x·exp(−ŝ) − t.
template <typename T>
__device__ __forceinline__ void affine_update(const T *x, const T *s, const T *t,
                                              const int *column, T *y, long long batch,
                                              int dim, int n, int kind, double clamp,
                                              int inverse, int shift_first) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= batch * dim) {
        return;
    }
    const long long row = i / dim;
    const int j = column[i - row * dim];
    if (j < 0) {
        y[i] = x[i];
        return;
    }
    T slope;
    const long long k = row * n + j;
    const T ls = scale_map<T>(s[k], kind, T(clamp), &slope);
    if (shift_first) {
        y[i] = inverse ? x[i] * exp(-ls) - t[k] : (x[i] + t[k]) * exp(ls);
    } else {
        y[i] = inverse ? (x[i] - t[k]) * exp(-ls) : x[i] * exp(ls) + t[k];
    }
}

// The update's gradients from the output gradient g, packed as [∂x | ∂s | ∂t]:
// (batch, dim), then (batch, n) twice. `xy` is the one of the op's input and output
// that its derivative in ŝ needs: the input for the forward map and the output for the
// inverse, or the other way round with `shift_first`.
template <typename T>
__device__ __forceinline__ void affine_update_grad(const T *xy, const T *s, const T *g,
                                                   const int *column, T *out, long long batch,
                                                   int dim, int n, int kind, double clamp,
                                                   int inverse, int shift_first) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= batch * dim) {
        return;
    }
    const long long row = i / dim;
    const int j = column[i - row * dim];
    if (j < 0) {
        out[i] = g[i];
        return;
    }
    T *gs = out + batch * dim;
    T *gt = gs + batch * n;
    T slope;
    const long long k = row * n + j;
    const T ls = scale_map<T>(s[k], kind, T(clamp), &slope);
    const T gi = g[i];
    if (shift_first) {
        if (inverse) {
            // out = x·e^{−ŝ} − t: ∂/∂x = e^{−ŝ}, ∂/∂ŝ = −x·e^{−ŝ} (xy = x), ∂/∂t = −1.
            const T e = exp(-ls);
            out[i] = gi * e;
            gs[k] = -gi * xy[i] * e * slope;
            gt[k] = -gi;
        } else {
            // out = (x + t)·e^{ŝ}: ∂/∂x = ∂/∂t = e^{ŝ}, ∂/∂ŝ = out (xy = out).
            const T e = exp(ls);
            out[i] = gi * e;
            gs[k] = gi * xy[i] * slope;
            gt[k] = gi * e;
        }
    } else if (inverse) {
        // y = (x − t)·e^{−ŝ}: ∂y/∂x = e^{−ŝ}, ∂y/∂ŝ = −y, ∂y/∂t = −e^{−ŝ}.
        const T e = exp(-ls);
        out[i] = gi * e;
        gs[k] = -gi * xy[i] * slope;
        gt[k] = -gi * e;
    } else {
        // y = x·e^{ŝ} + t: ∂y/∂x = e^{ŝ}, ∂y/∂ŝ = x·e^{ŝ}, ∂y/∂t = 1.
        const T e = exp(ls);
        out[i] = gi * e;
        gs[k] = gi * xy[i] * e * slope;
        gt[k] = gi;
    }
}

// log|det| of each row: Σ ŝ, negated for the inverse.
template <typename T>
__device__ __forceinline__ void affine_log_det(const T *s, T *out, long long batch, int n,
                                               int kind, double clamp, int inverse) {
    const long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (row >= batch) {
        return;
    }
    T sum = T(0), slope;
    for (int j = 0; j < n; ++j) {
        sum = sum + scale_map<T>(s[row * n + j], kind, T(clamp), &slope);
    }
    out[row] = inverse ? -sum : sum;
}

// The log-det's gradient in s from the gradient g of each row's log-det.
template <typename T>
__device__ __forceinline__ void affine_log_det_grad(const T *s, const T *g, T *out,
                                                    long long batch, int n, int kind,
                                                    double clamp, int inverse) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= batch * n) {
        return;
    }
    T slope;
    scale_map<T>(s[i], kind, T(clamp), &slope);
    const T k = inverse ? -g[i / n] : g[i / n];
    out[i] = k * slope;
}

#define AFFINE_KERNELS(T, SUFFIX)                                                         \
    extern "C" __global__ void affine_update_##SUFFIX(                                   \
        const T *x, const T *s, const T *t, const int *column, T *y, long long batch,    \
        int dim, int n, int kind, double clamp, int inverse, int shift_first) {          \
        affine_update<T>(x, s, t, column, y, batch, dim, n, kind, clamp, inverse,        \
                         shift_first);                                                   \
    }                                                                                     \
    extern "C" __global__ void affine_update_grad_##SUFFIX(                              \
        const T *xy, const T *s, const T *g, const int *column, T *out, long long batch, \
        int dim, int n, int kind, double clamp, int inverse, int shift_first) {          \
        affine_update_grad<T>(xy, s, g, column, out, batch, dim, n, kind, clamp,         \
                              inverse, shift_first);                                     \
    }                                                                                     \
    extern "C" __global__ void affine_log_det_##SUFFIX(const T *s, T *out,               \
                                                       long long batch, int n, int kind, \
                                                       double clamp, int inverse) {      \
        affine_log_det<T>(s, out, batch, n, kind, clamp, inverse);                       \
    }                                                                                     \
    extern "C" __global__ void affine_log_det_grad_##SUFFIX(                             \
        const T *s, const T *g, T *out, long long batch, int n, int kind, double clamp,  \
        int inverse) {                                                                   \
        affine_log_det_grad<T>(s, g, out, batch, n, kind, clamp, inverse);               \
    }

AFFINE_KERNELS(float, f32)
AFFINE_KERNELS(double, f64)
