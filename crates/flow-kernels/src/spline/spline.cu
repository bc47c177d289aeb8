// CUDA kernels for the rational-quadratic spline, the GPU counterpart of the CPU
// kernel in mod.rs, term for term. Compiled to PTX by build.rs when the `cuda`
// feature is on.
//
// x is (batch, n), theta (batch, n, P) with P = 3K - 1 raw parameters per element
// (K widths, K heights, K - 1 inner derivatives). One thread per row: it writes the
// row's outputs and their summed log-slope, so no two threads share an output and
// the results do not depend on scheduling.
//
// style 0 is Durkan's parametrisation (softmax with a minimum bin size, softplus
// derivatives), style 1 zuko's (soft-clipped raw values, softmax, exponential
// derivatives).

// MAX_BINS, the most bins a spline may have here, is set by whoever compiles this
// file (build.rs, the emulation test) from CUDA_MAX_BINS in src/limits.rs.
#ifndef MAX_BINS
#error "compile with -DMAX_BINS=<CUDA_MAX_BINS from src/limits.rs>"
#endif

struct SplineArgs {
    int bins;
    int style;
    double bound;
    double min_width;
    double min_height;
    double min_derivative;
};

template <typename T>
struct Knots {
    T x[MAX_BINS + 1];
    T y[MAX_BINS + 1];
    T d[MAX_BINS + 1];
    T pw[MAX_BINS];
    T ph[MAX_BINS];
};

template <typename T>
struct Bin {
    T x0, x1, y0, y1, d0, d1;
};

// zuko's soft clip v / (1 + |f v / ln slope|), and its derivative in `grad`.
template <typename T>
__device__ __forceinline__ T soft_clip(T v, double f, const SplineArgs &a, T *grad) {
    const T k = T(fabs(f / log(a.min_derivative)));
    const T den = T(1) + k * fabs(v);
    if (grad) {
        *grad = T(1) / (den * den);
    }
    return v / den;
}

template <typename T>
__device__ __forceinline__ T softplus(T v) {
    return fmax(v, T(0)) + log1p(exp(-fabs(v)));
}

// Softmax of the (clipped) raw sizes into p, then positions from -B to B into at.
template <typename T>
__device__ void positions(const T *raw, double min, const SplineArgs &a, T *p, T *at) {
    const int k = a.bins;
    T m = -INFINITY;
    for (int i = 0; i < k; ++i) {
        p[i] = a.style == 1 ? soft_clip(raw[i], 2.0, a, (T *)nullptr) : raw[i];
        m = fmax(m, p[i]);
    }
    T sum = T(0);
    for (int i = 0; i < k; ++i) {
        p[i] = exp(p[i] - m);
        sum += p[i];
    }
    for (int i = 0; i < k; ++i) {
        p[i] /= sum;
    }
    const T scale = a.style == 1 ? T(1) : T(1.0 - min * k);
    const T floor = a.style == 1 ? T(0) : T(min);
    const T b = T(a.bound);
    const T two_b = T(2.0 * a.bound);
    at[0] = -b;
    T acc = T(0);
    for (int j = 1; j < k; ++j) {
        acc += p[j - 1] * scale + floor;
        at[j] = acc * two_b - b;
    }
    at[k] = b;
}

template <typename T>
__device__ void knots(const T *theta, const SplineArgs &a, Knots<T> &kn) {
    const int k = a.bins;
    positions(theta, a.min_width, a, kn.pw, kn.x);
    positions(theta + k, a.min_height, a, kn.ph, kn.y);
    kn.d[0] = T(1);
    kn.d[k] = T(1);
    for (int j = 1; j < k; ++j) {
        const T r = theta[2 * k + j - 1];
        kn.d[j] = a.style == 1 ? exp(soft_clip(r, 1.0, a, (T *)nullptr))
                               : softplus(r) + T(a.min_derivative);
    }
}

// The number of inner knots at or below v.
template <typename T>
__device__ __forceinline__ int bin_index(T v, const T *at, int bins) {
    int i = 0;
    while (i < bins - 1 && at[i + 1] <= v) {
        ++i;
    }
    return i;
}

template <typename T>
__device__ __forceinline__ Bin<T> bin_of(const Knots<T> &kn, int k) {
    return Bin<T>{kn.x[k], kn.x[k + 1], kn.y[k], kn.y[k + 1], kn.d[k], kn.d[k + 1]};
}

template <typename T>
__device__ __forceinline__ T log_slope(const Bin<T> &b, T z, T s) {
    const T one_z = T(1) - z;
    const T q = z * one_z;
    const T n2 = b.d1 * z * z + T(2) * s * q + b.d0 * one_z * one_z;
    const T den = s + (b.d0 + b.d1 - T(2) * s) * q;
    return log(s * s) + log(n2) - T(2) * log(den);
}

template <typename T>
__device__ __forceinline__ void forward_in(const Bin<T> &b, T v, T *y, T *ld) {
    const T w = b.x1 - b.x0, h = b.y1 - b.y0;
    const T s = h / w;
    const T z = (v - b.x0) / w;
    const T q = z * (T(1) - z);
    const T num = s * z * z + b.d0 * q;
    const T den = s + (b.d0 + b.d1 - T(2) * s) * q;
    *y = b.y0 + h * num / den;
    *ld = log_slope(b, z, s);
}

template <typename T>
__device__ __forceinline__ void inverse_in(const Bin<T> &b, T v, T *x, T *ld) {
    const T w = b.x1 - b.x0, h = b.y1 - b.y0;
    const T s = h / w;
    const T dy = v - b.y0;
    const T curve = b.d0 + b.d1 - T(2) * s;
    const T qa = h * (s - b.d0) + dy * curve;
    const T qb = h * b.d0 - dy * curve;
    const T qc = -s * dy;
    const T disc = fmax(qb * qb - T(4) * qa * qc, T(0));
    const T z = T(2) * qc / (-qb - sqrt(disc));
    *x = b.x0 + z * w;
    *ld = -log_slope(b, z, s);
}

// The gradient of ca * y + cb * log-slope of the forward map at v, to v (returned)
// and to the bin's six numbers (into g).
template <typename T>
__device__ T gradient_in(const Bin<T> &b, T v, T ca, T cb, Bin<T> &g) {
    const T one = T(1), two = T(2);
    const T w = b.x1 - b.x0, h = b.y1 - b.y0;
    const T s = h / w;
    const T z = (v - b.x0) / w;
    const T q = z * (one - z);
    const T num = s * z * z + b.d0 * q;
    const T den = s + (b.d0 + b.d1 - two * s) * q;
    const T n2 = b.d1 * z * z + two * s * q + b.d0 * (one - z) * (one - z);
    g.y0 = ca;
    T g_h = ca * num / den;
    const T g_num = ca * h / den;
    T g_den = -ca * h * num / (den * den);
    T g_s = cb * two / s;
    const T g_n2 = cb / n2;
    g_den -= two * cb / den;
    g_s += g_num * z * z;
    T g_z = g_num * two * s * z;
    g.d0 = g_num * q;
    T g_q = g_num * b.d0;
    g_s += g_den * (one - two * q);
    g.d0 += g_den * q;
    g.d1 = g_den * q;
    g_q += g_den * (b.d0 + b.d1 - two * s);
    g.d1 += g_n2 * z * z;
    g_z += g_n2 * (two * b.d1 * z - two * b.d0 * (one - z));
    g_s += g_n2 * two * q;
    g_q += g_n2 * two * s;
    g.d0 += g_n2 * (one - z) * (one - z);
    g_z += g_q * (one - two * z);
    const T g_v = g_z / w;
    T g_w = -g_z * z / w;
    g.x0 = -g_z / w;
    g_h += g_s / w;
    g_w -= g_s * s / w;
    g.x1 = g_w;
    g.x0 -= g_w;
    g.y1 = g_h;
    g.y0 -= g_h;
    return g_v;
}

// Adds the gradients g of bin k's six numbers, through the knots, to the raw
// parameters gt.
template <typename T>
__device__ void knot_gradients(const T *theta, const Knots<T> &kn, int k, const Bin<T> &g,
                               const SplineArgs &a, T *gt) {
    const int bins = a.bins;
    const T two_b = T(2.0 * a.bound);
    for (int axis = 0; axis < 2; ++axis) {
        const T gk = axis == 0 ? g.x0 : g.y0;
        const T gk1 = axis == 0 ? g.x1 : g.y1;
        const T *p = axis == 0 ? kn.pw : kn.ph;
        const double min = axis == 0 ? a.min_width : a.min_height;
        const T *raw = theta + axis * bins;
        T *out = gt + axis * bins;
        const T scale = a.style == 1 ? T(1) : T(1.0 - min * bins);
        // Position j (1 <= j <= K - 1) sums the sizes before it.
        const bool inner_k = k >= 1 && k < bins;
        const bool inner_k1 = k + 1 < bins;
        T dot = T(0);
        for (int i = 0; i < bins; ++i) {
            T gs = T(0);
            if (inner_k && k > i) gs += gk;
            if (inner_k1 && k + 1 > i) gs += gk1;
            dot += gs * two_b * scale * p[i];
        }
        for (int i = 0; i < bins; ++i) {
            T gs = T(0);
            if (inner_k && k > i) gs += gk;
            if (inner_k1 && k + 1 > i) gs += gk1;
            T gu = p[i] * (gs * two_b * scale - dot);
            if (a.style == 1) {
                T dclip;
                soft_clip(raw[i], 2.0, a, &dclip);
                gu *= dclip;
            }
            out[i] += gu;
        }
    }
    for (int e = 0; e < 2; ++e) {
        const int j = k + e;
        const T gd = e == 0 ? g.d0 : g.d1;
        if (j == 0 || j == bins) {
            continue;  // the end derivatives are fixed at 1
        }
        const T r = theta[2 * bins + j - 1];
        T dr;
        if (a.style == 1) {
            T dclip;
            const T u = soft_clip(r, 1.0, a, &dclip);
            dr = exp(u) * dclip;
        } else {
            dr = T(1) / (T(1) + exp(-r));
        }
        gt[2 * bins + j - 1] += gd * dr;
    }
}

template <typename T>
__device__ void spline_forward(const T *x, const T *theta, T *out, int batch, int n,
                               SplineArgs a, int inverse) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= batch) {
        return;
    }
    const int p = 3 * a.bins - 1;
    const T b = T(a.bound);
    Knots<T> kn;
    T total = T(0);
    for (int j = 0; j < n; ++j) {
        const long long e = (long long)r * n + j;
        const T v = x[e];
        T *o = out + (long long)r * (n + 1) + j;
        if (!(v >= -b && v <= b)) {
            *o = v;
            continue;
        }
        knots(theta + e * p, a, kn);
        T y, ld;
        if (inverse) {
            inverse_in(bin_of(kn, bin_index(v, kn.y, a.bins)), v, &y, &ld);
        } else {
            forward_in(bin_of(kn, bin_index(v, kn.x, a.bins)), v, &y, &ld);
        }
        *o = y;
        total += ld;
    }
    out[(long long)r * (n + 1) + n] = total;
}

// Gradients [gx (n) | gtheta (n P)] per row into `grad` (zeroed), from the output
// gradient g (batch, n + 1).
template <typename T>
__device__ void spline_backward(const T *x, const T *theta, const T *g, T *grad, int batch,
                                int n, SplineArgs a, int inverse) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= batch) {
        return;
    }
    const int p = 3 * a.bins - 1;
    const T b = T(a.bound);
    const T *gr = g + (long long)r * (n + 1);
    const T gl = gr[n];
    T *gx = grad + (long long)r * n * (p + 1);
    T *gtheta = gx + n;
    Knots<T> kn;
    for (int j = 0; j < n; ++j) {
        const long long e = (long long)r * n + j;
        const T v = x[e];
        if (!(v >= -b && v <= b)) {
            gx[j] = gr[j];
            continue;
        }
        const T *th = theta + e * p;
        knots(th, a, kn);
        Bin<T> gb;
        if (inverse) {
            const int k = bin_index(v, kn.y, a.bins);
            const Bin<T> bin = bin_of(kn, k);
            T u, l;
            inverse_in(bin, v, &u, &l);
            // u = F^-1(v): du/dv = 1 / F'(u), du/dtheta = -F_theta / F'(u); the
            // log-det is -L(u) with L the forward log-slope.
            const T f_u = exp(-l);
            Bin<T> unused;
            const T l_u = gradient_in(bin, u, T(0), T(1), unused);
            const T c = (gr[j] - gl * l_u) / f_u;
            gx[j] = c;
            gradient_in(bin, u, -c, -gl, gb);
            knot_gradients(th, kn, k, gb, a, gtheta + j * p);
        } else {
            const int k = bin_index(v, kn.x, a.bins);
            gx[j] = gradient_in(bin_of(kn, k), v, gr[j], gl, gb);
            knot_gradients(th, kn, k, gb, a, gtheta + j * p);
        }
    }
}

#define INSTANTIATE(T, NAME)                                                              \
    extern "C" __global__ void fused_spline_fwd_##NAME(                                  \
        const T *x, const T *theta, T *out, int batch, int n, int bins, int style,       \
        double bound, double min_width, double min_height, double min_derivative,        \
        int inverse) {                                                                   \
        const SplineArgs a{bins, style, bound, min_width, min_height, min_derivative};   \
        spline_forward<T>(x, theta, out, batch, n, a, inverse);                          \
    }                                                                                    \
    extern "C" __global__ void fused_spline_bwd_##NAME(                                  \
        const T *x, const T *theta, const T *g, T *grad, int batch, int n, int bins,     \
        int style, double bound, double min_width, double min_height,                    \
        double min_derivative, int inverse) {                                            \
        const SplineArgs a{bins, style, bound, min_width, min_height, min_derivative};   \
        spline_backward<T>(x, theta, g, grad, batch, n, a, inverse);                     \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
