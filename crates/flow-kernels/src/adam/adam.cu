// Adam, AdamW and Adamax over every variable of a model in one launch: the GPU
// counterpart of the CPU kernels in mod.rs, term for term. Compiled to PTX by build.rs
// when the `cuda` feature is on.
//
// The launch reads a table with one row of ADAM_COLUMNS 64-bit words per variable:
// the addresses of its parameters θ, first moment m, second statistic v and gradient
// g, its length, and the first block that works on it (the rows in order, the first
// blocks increasing). Block b finds its row by binary search over the first blocks
// and its threads stride over that row's chunk of `chunk` elements, so every element
// is updated by exactly one thread and no thread waits for another.

#define ADAM_COLUMNS 6

// One element: u = g + λθ, m ← β₁m + (1 − β₁)u, then either v ← β₂v + (1 − β₂)u² and
// θ ← keep·θ − α·m / (√(v·κ) + ε), or (Adamax) v ← max(β₂v, |u| + ε) and
// θ ← keep·θ − α·m / v.
template <typename T>
__device__ __forceinline__ void adam_element(T *theta, T *m, T *v, const T *g, long long i,
                                             T beta1, T rest1, T beta2, T rest2, T l2,
                                             T alpha, T kappa, T eps, T keep,
                                             int infinity_norm) {
    const T th = theta[i];
    const T u = g[i] + l2 * th;
    const T mi = beta1 * m[i] + rest1 * u;
    m[i] = mi;
    if (infinity_norm) {
        const T a = beta2 * v[i];
        const T b = (u < T(0) ? -u : u) + eps;
        const T vi = a > b ? a : b;
        v[i] = vi;
        theta[i] = keep * th - alpha * mi / vi;
    } else {
        const T vi = beta2 * v[i] + rest2 * u * u;
        v[i] = vi;
        theta[i] = keep * th - alpha * mi / (sqrt(vi * kappa) + eps);
    }
}

template <typename T>
__device__ __forceinline__ void adam_multi(const unsigned long long *table, int rows,
                                           long long chunk, double beta1, double beta2,
                                           double l2, double alpha, double kappa,
                                           double eps, double decay, int infinity_norm) {
    const unsigned long long block = blockIdx.x;
    int lo = 0, hi = rows - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (table[mid * ADAM_COLUMNS + 5] <= block) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    const unsigned long long *row = table + lo * ADAM_COLUMNS;
    T *theta = reinterpret_cast<T *>(row[0]);
    T *m = reinterpret_cast<T *>(row[1]);
    T *v = reinterpret_cast<T *>(row[2]);
    const T *g = reinterpret_cast<const T *>(row[3]);
    const long long n = static_cast<long long>(row[4]);
    const long long start = static_cast<long long>(block - row[5]) * chunk;
    const long long end = start + chunk < n ? start + chunk : n;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        adam_element<T>(theta, m, v, g, i, T(beta1), T(1.0 - beta1), T(beta2),
                        T(1.0 - beta2), T(l2), T(alpha), T(kappa), T(eps), T(1.0 - decay),
                        infinity_norm);
    }
}

#define ADAM_KERNEL(NAME, T)                                                              \
    extern "C" __global__ void NAME(const unsigned long long *table, int rows,           \
                                    long long chunk, double beta1, double beta2,         \
                                    double l2, double alpha, double kappa, double eps,   \
                                    double decay, int infinity_norm) {                   \
        adam_multi<T>(table, rows, chunk, beta1, beta2, l2, alpha, kappa, eps, decay,    \
                      infinity_norm);                                                    \
    }

ADAM_KERNEL(adam_multi_f32, float)
ADAM_KERNEL(adam_multi_f64, double)
