// CUDA kernels for the fused conditioner `Linear -> act -> Linear`, the GPU
// counterpart of the CPU kernels beside this file. Compiled to PTX by build.rs
// when the `cuda` feature is on.
//
// Parameters travel packed as on the CPU: p1 = [W1 | b1] (hidden, in + 1) and
// p2 = [W2 | b2] (out, hidden + 1); x is (batch, in), the output (batch, out).
// Activations: kind 0 is piecewise linear with slope `c` below zero (leaky-relu,
// relu with c = 0), kind 1 is tanh.

// MAX_IO, the most inputs or outputs of a network, is set by whoever compiles this
// file (build.rs, the emulation test) from CUDA_MAX_IO in src/limits.rs.
#ifndef MAX_IO
#error "compile with -DMAX_IO=<CUDA_MAX_IO from src/limits.rs>"
#endif
#define WARP 32

template <typename T>
__device__ __forceinline__ T act(T z, int kind, T c) {
    return kind == 1 ? tanh(z) : (z > T(0) ? z : c * z);
}

// Derivative at pre-activation z, with y = act(z).
template <typename T>
__device__ __forceinline__ T act_grad(T z, T y, int kind, T c) {
    return kind == 1 ? T(1) - y * y : (z > T(0) ? T(1) : c);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    return v;
}

// One thread per sample walks the hidden units; every thread of a warp reads the
// same weights at the same time, so they come from cache as broadcasts.
template <typename T>
__device__ void mlp_forward(const T *x, const T *p1, const T *p2, T *out, int batch,
                            int in, int hidden, int out_dim, int kind, T c) {
    // Row offsets in 64 bits: batch · in may pass 2³¹ where batch does not.
    const long long s = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= batch) {
        return;
    }
    T xs[MAX_IO];
    T acc[MAX_IO];
#pragma unroll
    for (int i = 0; i < MAX_IO; ++i) {
        xs[i] = i < in ? x[s * in + i] : T(0);
    }
#pragma unroll
    for (int o = 0; o < MAX_IO; ++o) {
        acc[o] = o < out_dim ? p2[o * (hidden + 1) + hidden] : T(0);
    }
    for (int h = 0; h < hidden; ++h) {
        const T *row = p1 + h * (in + 1);
        T z = row[in];
#pragma unroll
        for (int i = 0; i < MAX_IO; ++i) {
            if (i < in) {
                z += row[i] * xs[i];
            }
        }
        const T y = act(z, kind, c);
#pragma unroll
        for (int o = 0; o < MAX_IO; ++o) {
            if (o < out_dim) {
                acc[o] += p2[o * (hidden + 1) + h] * y;
            }
        }
    }
#pragma unroll
    for (int o = 0; o < MAX_IO; ++o) {
        if (o < out_dim) {
            out[s * out_dim + o] = acc[o];
        }
    }
}

// The gradients, packed into one buffer `grad` = [gx (batch, in) | gp1 | gp2], which
// must start zeroed. One thread per hidden unit (grid x) and one block row per chunk
// of `chunk` samples (grid y): a thread keeps its unit's weights and gradient sums in
// registers while its chunk's samples pass, and adds the sums once at the end. The
// input gradients, sums over hidden units, are reduced within each warp first. The
// sums across warps and chunks are atomic additions, so their order, and with it the
// gradients' last bits, follows the scheduling from run to run.
template <typename T>
__device__ void mlp_backward(const T *x, const T *p1, const T *p2, const T *g, T *grad,
                             int batch, int in, int hidden, int out_dim, int kind, T c,
                             int chunk) {
    T *gx = grad;
    T *gp1 = gx + (long long)batch * in;
    T *gp2 = gp1 + hidden * (in + 1);
    const int h = blockIdx.x * blockDim.x + threadIdx.x;
    // Threads past the last unit compute zeros, so that whole warps join the sums.
    const bool live = h < hidden;
    const int lane = threadIdx.x % WARP;
    const long long s0 = (long long)blockIdx.y * chunk;
    const long long s1 = min((long long)batch, s0 + chunk);

    T w1[MAX_IO], w2[MAX_IO], gw1[MAX_IO], gw2[MAX_IO];
    const T b1 = live ? p1[h * (in + 1) + in] : T(0);
#pragma unroll
    for (int i = 0; i < MAX_IO; ++i) {
        w1[i] = live && i < in ? p1[h * (in + 1) + i] : T(0);
        gw1[i] = T(0);
    }
#pragma unroll
    for (int o = 0; o < MAX_IO; ++o) {
        w2[o] = live && o < out_dim ? p2[o * (hidden + 1) + h] : T(0);
        gw2[o] = T(0);
    }
    T gb1 = T(0);

    for (long long s = s0; s < s1; ++s) {
        const T *xs = x + s * in;
        const T *gs = g + s * out_dim;
        T z = b1;
#pragma unroll
        for (int i = 0; i < MAX_IO; ++i) {
            if (i < in) {
                z += w1[i] * xs[i];
            }
        }
        const T y = live ? act(z, kind, c) : T(0);
        T gz = T(0);
#pragma unroll
        for (int o = 0; o < MAX_IO; ++o) {
            if (o < out_dim) {
                gz += gs[o] * w2[o];
                gw2[o] += gs[o] * y;
            }
        }
        gz *= act_grad(z, y, kind, c);
        gb1 += gz;
#pragma unroll
        for (int i = 0; i < MAX_IO; ++i) {
            if (i < in) {
                gw1[i] += gz * xs[i];
                const T part = warp_sum(w1[i] * gz);
                if (lane == 0) {
                    atomicAdd(gx + s * in + i, part);
                }
            }
        }
    }

    if (live) {
#pragma unroll
        for (int i = 0; i < MAX_IO; ++i) {
            if (i < in) {
                atomicAdd(gp1 + h * (in + 1) + i, gw1[i]);
            }
        }
        atomicAdd(gp1 + h * (in + 1) + in, gb1);
#pragma unroll
        for (int o = 0; o < MAX_IO; ++o) {
            if (o < out_dim) {
                atomicAdd(gp2 + o * (hidden + 1) + h, gw2[o]);
            }
        }
    }
    // The output bias's gradient: the chunk's sum of g, added by one thread per chunk.
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        for (int o = 0; o < out_dim; ++o) {
            T sum = T(0);
            for (long long s = s0; s < s1; ++s) {
                sum += g[s * out_dim + o];
            }
            atomicAdd(gp2 + o * (hidden + 1) + hidden, sum);
        }
    }
}

// ---- Networks of any depth and width, plain or residual: one kernel per linear layer
// and pass, one thread per output element. The host runs them layer by layer
// (cuda.rs); parameters are packed per layer as above, p = [W | b] (n, k + 1). A null
// pointer leaves out the optional inputs. ----

// The layers of a network of any shape take their products from cuBLAS (see
// `Product` in cuda.rs); these kernels are the work around the products, one thread
// per element.

// z (rows x n) holds h . W^T: adds the bias (and `add`); with y given, also y = act(z).
template <typename T>
__device__ void linear_epilogue(T *z, const T *p, const T *add, T *y, int rows, int k, int n,
                                int kind, T c) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)rows * n) {
        return;
    }
    const int j = idx % n;
    T acc = z[idx] + p[(long long)j * (k + 1) + k];
    if (add) {
        acc += add[idx];
    }
    z[idx] = acc;
    if (y) {
        y[idx] = act(acc, kind, c);
    }
}

// g (rows x k) holds dz . W: with z given, times act'(z) (y = act(z)); plus `add` if
// given.
template <typename T>
__device__ void input_epilogue(T *g, const T *z, const T *y, const T *add, int rows, int k,
                               int kind, T c) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)rows * k) {
        return;
    }
    T acc = g[idx];
    if (z) {
        acc *= act_grad(z[idx], y[idx], kind, c);
    }
    if (add) {
        acc += add[idx];
    }
    g[idx] = acc;
}

// gp[j (k + 1) + k] += sum over rows of dz[r, j]: the bias gradient, one thread per
// output (the weights' part is a product).
template <typename T>
__device__ void bias_grad(const T *dz, T *gp, int rows, int k, int n) {
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) {
        return;
    }
    T acc = T(0);
    for (long long r = 0; r < rows; ++r) {
        acc += dz[r * n + j];
    }
    gp[j * (k + 1) + k] += acc;
}

// y = act(z), element by element.
template <typename T>
__device__ void activate(const T *z, T *y, long long len, int kind, T c) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < len) {
        y[idx] = act(z[idx], kind, c);
    }
}

#define INSTANTIATE(T, NAME)                                                            \
    extern "C" __global__ void fused_mlp_fwd_##NAME(                                   \
        const T *x, const T *p1, const T *p2, T *out, int batch, int in, int hidden,   \
        int out_dim, int kind, T c) {                                                  \
        mlp_forward<T>(x, p1, p2, out, batch, in, hidden, out_dim, kind, c);           \
    }                                                                                  \
    extern "C" __global__ void fused_mlp_bwd_##NAME(                                   \
        const T *x, const T *p1, const T *p2, const T *g, T *grad, int batch, int in,  \
        int hidden, int out_dim, int kind, T c, int chunk) {                           \
        mlp_backward<T>(x, p1, p2, g, grad, batch, in, hidden, out_dim, kind, c,       \
                        chunk);                                                        \
    }                                                                                  \
    extern "C" __global__ void fused_linear_epilogue_##NAME(                           \
        T *z, const T *p, const T *add, T *y, int rows, int k, int n, int kind, T c) { \
        linear_epilogue<T>(z, p, add, y, rows, k, n, kind, c);                         \
    }                                                                                  \
    extern "C" __global__ void fused_input_epilogue_##NAME(                            \
        T *g, const T *z, const T *y, const T *add, int rows, int k, int kind, T c) {  \
        input_epilogue<T>(g, z, y, add, rows, k, kind, c);                             \
    }                                                                                  \
    extern "C" __global__ void fused_bias_grad_##NAME(const T *dz, T *gp, int rows,    \
                                                      int k, int n) {                  \
        bias_grad<T>(dz, gp, rows, k, n);                                              \
    }                                                                                  \
    extern "C" __global__ void fused_activate_##NAME(const T *z, T *y, long long len,  \
                                                     int kind, T c) {                  \
        activate<T>(z, y, len, kind, c);                                               \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
