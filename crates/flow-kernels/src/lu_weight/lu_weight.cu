// CUDA kernels of the weight of an LU-parametrised invertible 1×1 convolution, the GPU
// counterpart of the CPU op in mod.rs. Compiled to PTX by build.rs when the `cuda`
// feature is on.
//
// W = P·M with M = L·U', all (c, c) row-major: L unit lower triangular with l's strict
// lower triangle, U' upper triangular with u's strict upper triangle and the diagonal
// d = sign·exp(log_s). P is taken as a matrix (a permutation in practice; its zeros
// are skipped). From ∂W, with ∂M = Pᵀ·∂W:
//   ∂l[k][m] = Σ_j ∂M[k][j]·U'[m][j]   (m < k, else 0),
//   ∂u[m][j] = Σ_k L[k][m]·∂M[k][j]     (m < j, else 0),
//   ∂log_s[j] = d[j]·Σ_k L[k][j]·∂M[k][j].
// Every kernel runs one thread per value it writes, with no other writer.

template <typename T>
__device__ __forceinline__ T lu_lower(const T *l, int c, int k, int m) {
    return m < k ? l[k * c + m] : (m == k ? T(1) : T(0));
}

template <typename T>
__device__ __forceinline__ T lu_upper(const T *u, const T *log_s, const T *sign, int c, int m,
                                      int j) {
    return m < j ? u[m * c + j] : (m == j ? sign[j] * exp(log_s[j]) : T(0));
}

// M[k][j].
template <typename T>
__device__ __forceinline__ T lu_product(const T *l, const T *u, const T *log_s, const T *sign,
                                        int c, int k, int j) {
    T sum = T(0);
    const int last = k < j ? k : j;
    for (int m = 0; m <= last; ++m) {
        sum += lu_lower<T>(l, c, k, m) * lu_upper<T>(u, log_s, sign, c, m, j);
    }
    return sum;
}

// ∂M[k][j] = Σ_i P[i][k]·∂W[i][j].
template <typename T>
__device__ __forceinline__ T lu_grad_m(const T *p, const T *g, int c, int k, int j) {
    T sum = T(0);
    for (int i = 0; i < c; ++i) {
        const T pik = p[i * c + k];
        if (pik != T(0)) {
            sum += pik * g[i * c + j];
        }
    }
    return sum;
}

// W (c, c), one thread per element.
template <typename T>
__device__ __forceinline__ void lu_weight_forward(const T *p, const T *l, const T *u,
                                                  const T *log_s, const T *sign, T *w, int c) {
    const long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= static_cast<long long>(c) * c) {
        return;
    }
    const int i = static_cast<int>(t / c), j = static_cast<int>(t % c);
    T sum = T(0);
    for (int k = 0; k < c; ++k) {
        const T pik = p[i * c + k];
        if (pik != T(0)) {
            sum += pik * lu_product<T>(l, u, log_s, sign, c, k, j);
        }
    }
    w[t] = sum;
}

// [∂l (c²) | ∂u (c²) | ∂log_s (c)] from ∂W, one thread per value.
template <typename T>
__device__ __forceinline__ void lu_weight_backward(const T *p, const T *l, const T *u,
                                                   const T *log_s, const T *sign, const T *g,
                                                   T *out, int c) {
    const long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long cc = static_cast<long long>(c) * c;
    if (t >= 2 * cc + c) {
        return;
    }
    T sum = T(0);
    if (t < cc) {
        const int k = static_cast<int>(t / c), m = static_cast<int>(t % c);
        if (m < k) {
            for (int j = m; j < c; ++j) {
                sum += lu_grad_m<T>(p, g, c, k, j) * lu_upper<T>(u, log_s, sign, c, m, j);
            }
        }
    } else if (t < 2 * cc) {
        const int m = static_cast<int>((t - cc) / c), j = static_cast<int>((t - cc) % c);
        if (m < j) {
            for (int k = m; k < c; ++k) {
                sum += lu_lower<T>(l, c, k, m) * lu_grad_m<T>(p, g, c, k, j);
            }
        }
    } else {
        const int j = static_cast<int>(t - 2 * cc);
        for (int k = j; k < c; ++k) {
            sum += lu_lower<T>(l, c, k, j) * lu_grad_m<T>(p, g, c, k, j);
        }
        sum *= sign[j] * exp(log_s[j]);
    }
    out[t] = sum;
}

#define LU_WEIGHT_KERNELS(T, SUFFIX)                                                       \
    extern "C" __global__ void lu_weight_forward_##SUFFIX(const T *p, const T *l,          \
                                                          const T *u, const T *log_s,      \
                                                          const T *sign, T *w, int c) {    \
        lu_weight_forward<T>(p, l, u, log_s, sign, w, c);                                  \
    }                                                                                      \
    extern "C" __global__ void lu_weight_backward_##SUFFIX(                                \
        const T *p, const T *l, const T *u, const T *log_s, const T *sign, const T *g,     \
        T *out, int c) {                                                                   \
        lu_weight_backward<T>(p, l, u, log_s, sign, g, out, c);                            \
    }

LU_WEIGHT_KERNELS(float, f32)
LU_WEIGHT_KERNELS(double, f64)
