// Runs the CUDA kernels of src/mlp/mlp.cu on the CPU under an emulation of CUDA's
// thread model, and compares them with a plain double-precision implementation of the
// same network. Each launch runs 32 OS threads as the lanes of a warp; the lanes meet
// at every shuffle (which is where a warp's lanes exchange values), and warps and
// blocks run one after another, which the kernels allow: they share data only
// through shuffles and atomics. Built and run by tests/cuda_kernels.rs.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
using std::min;
using std::tanh;

static std::barrier<> *warp_barrier;
static double lane_values[32];
static std::mutex atomic_mutex;

template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
    const int lane = threadIdx.x % 32;
    warp_barrier->arrive_and_wait();
    lane_values[lane] = static_cast<double>(v);
    warp_barrier->arrive_and_wait();
    const T out = lane + offset < 32 ? static_cast<T>(lane_values[lane + offset]) : v;
    warp_barrier->arrive_and_wait();
    return out;
}

template <typename T>
void atomicAdd(T *p, T v) {
    std::lock_guard<std::mutex> lock(atomic_mutex);
    *p += v;
}

#define __device__
#define __global__
#define __forceinline__ inline
#include "mlp.cu"

static void launch(dim3 grid, dim3 block, const std::function<void()> &kernel) {
    gridDim = grid;
    blockDim = block;
    std::barrier<> bar(32);
    warp_barrier = &bar;
    std::vector<std::thread> lanes;
    for (unsigned l = 0; l < 32; ++l) {
        lanes.emplace_back([&, l] {
            for (unsigned by = 0; by < grid.y; ++by) {
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    for (unsigned w = 0; w < block.x / 32; ++w) {
                        blockIdx.x = bx;
                        blockIdx.y = by;
                        threadIdx.x = w * 32 + l;
                        kernel();
                        bar.arrive_and_wait();  // a warp's lanes finish together
                    }
                }
            }
        });
    }
    for (auto &t : lanes) {
        t.join();
    }
}

// Largest difference relative to the reference's largest magnitude (at least 1).
static double rel_err(const double *a, const std::vector<double> &b) {
    double diff = 0, scale = 1;
    for (size_t i = 0; i < b.size(); ++i) {
        diff = std::max(diff, std::fabs(a[i] - b[i]));
        scale = std::max(scale, std::fabs(b[i]));
    }
    return diff / scale;
}

template <typename T>
static double check(int batch, int in, int hidden, int out, int kind, double c) {
    std::mt19937 rng(7);
    std::normal_distribution<double> normal(0, 1);
    std::vector<T> x(batch * in), p1(hidden * (in + 1)), p2(out * (hidden + 1)), g(batch * out);
    for (auto *v : {&x, &p1, &p2, &g}) {
        for (auto &e : *v) {
            e = static_cast<T>(normal(rng));
        }
    }

    // The reference: per sample, hidden layer, outputs, and back again.
    const size_t n0 = batch * in, n1 = p1.size(), n2 = p2.size();
    std::vector<double> ref_out(batch * out, 0), ref_gx(n0, 0), ref_g1(n1, 0), ref_g2(n2, 0);
    for (int s = 0; s < batch; ++s) {
        std::vector<double> z(hidden), y(hidden), gz(hidden, 0);
        for (int h = 0; h < hidden; ++h) {
            z[h] = p1[h * (in + 1) + in];
            for (int i = 0; i < in; ++i) {
                z[h] += double(p1[h * (in + 1) + i]) * x[s * in + i];
            }
            y[h] = kind == 1 ? std::tanh(z[h]) : (z[h] > 0 ? z[h] : c * z[h]);
        }
        for (int o = 0; o < out; ++o) {
            double acc = p2[o * (hidden + 1) + hidden];
            const double go = g[s * out + o];
            for (int h = 0; h < hidden; ++h) {
                acc += double(p2[o * (hidden + 1) + h]) * y[h];
                gz[h] += go * p2[o * (hidden + 1) + h];
                ref_g2[o * (hidden + 1) + h] += go * y[h];
            }
            ref_g2[o * (hidden + 1) + hidden] += go;
            ref_out[s * out + o] = acc;
        }
        for (int h = 0; h < hidden; ++h) {
            gz[h] *= kind == 1 ? 1 - y[h] * y[h] : (z[h] > 0 ? 1 : c);
            ref_g1[h * (in + 1) + in] += gz[h];
            for (int i = 0; i < in; ++i) {
                ref_g1[h * (in + 1) + i] += gz[h] * x[s * in + i];
                ref_gx[s * in + i] += gz[h] * p1[h * (in + 1) + i];
            }
        }
    }

    // The kernels, launched as the Rust side launches them.
    const unsigned threads = 128, chunk = 64;
    std::vector<T> y(batch * out, T(-999));
    launch({(batch + threads - 1) / threads, 1}, {threads, 1}, [&] {
        mlp_forward<T>(x.data(), p1.data(), p2.data(), y.data(), batch, in, hidden, out, kind, T(c));
    });
    std::vector<T> grad(n0 + n1 + n2, T(0));
    launch({(hidden + threads - 1) / threads, (batch + chunk - 1) / chunk}, {threads, 1}, [&] {
        mlp_backward<T>(x.data(), p1.data(), p2.data(), g.data(), grad.data(), batch, in, hidden,
                        out, kind, T(c), chunk);
    });

    std::vector<double> yd(y.begin(), y.end()), gd(grad.begin(), grad.end());
    return std::max({rel_err(yd.data(), ref_out), rel_err(gd.data(), ref_gx),
                     rel_err(gd.data() + n0, ref_g1), rel_err(gd.data() + n0 + n1, ref_g2)});
}

int main() {
    // (in, hidden, out, batch): partial blocks of threads and of sample chunks, one
    // sample, the widest inputs and outputs the kernels take.
    const int cases[][4] = {{1, 130, 1, 150}, {3, 37, 5, 130}, {2, 64, 4, 1}, {16, 20, 16, 70}};
    bool ok = true;
    for (const auto &k : cases) {
        for (int kind = 0; kind < 2; ++kind) {
            const double c = kind == 0 ? 0.01 : 0.0;
            const double e32 = check<float>(k[3], k[0], k[1], k[2], kind, c);
            const double e64 = check<double>(k[3], k[0], k[1], k[2], kind, c);
            const bool pass = e32 < 1e-5 && e64 < 1e-12;
            ok = ok && pass;
            std::printf("%s in %d hidden %d out %d batch %d %s: f32 %.1e, f64 %.1e\n",
                        pass ? "ok  " : "FAIL", k[0], k[1], k[2], k[3],
                        kind == 0 ? "leaky-relu" : "tanh", e32, e64);
        }
    }
    return ok ? 0 : 1;
}
