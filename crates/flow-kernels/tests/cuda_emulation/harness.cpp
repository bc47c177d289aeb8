// Runs the CUDA kernels of src/mlp/mlp.cu on the CPU under the emulation of CUDA's
// thread model in warps.hpp, and compares them with a plain double-precision
// implementation of the same network. Built and run by tests/cuda_kernels.rs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "warps.hpp"
#include "mlp.cu"

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

    // The kernels, launched as the Rust side launches them: the backward pass in chunks
    // of 64 samples, and of 100, the chunk a batch of 99·65535 to 100·65535 samples
    // gets so that its block rows fit a grid.
    const unsigned threads = 128;
    std::vector<T> y(batch * out, T(-999));
    launch({(batch + threads - 1) / threads, 1}, {threads, 1}, [&] {
        mlp_forward<T>(x.data(), p1.data(), p2.data(), y.data(), batch, in, hidden, out, kind, T(c));
    });
    std::vector<double> yd(y.begin(), y.end());
    double worst = rel_err(yd.data(), ref_out);
    for (const int chunk : {64, 100}) {
        std::vector<T> grad(n0 + n1 + n2, T(0));
        launch({(hidden + threads - 1) / threads, unsigned((batch + chunk - 1) / chunk)},
               {threads, 1}, [&] {
                   mlp_backward<T>(x.data(), p1.data(), p2.data(), g.data(), grad.data(), batch,
                                   in, hidden, out, kind, T(c), chunk);
               });
        std::vector<double> gd(grad.begin(), grad.end());
        worst = std::max({worst, rel_err(gd.data(), ref_gx), rel_err(gd.data() + n0, ref_g1),
                          rel_err(gd.data() + n0 + n1, ref_g2)});
    }
    return worst;
}

static double act_ref(double z, int kind, double c) {
    return kind == 1 ? std::tanh(z) : (z > 0 ? z : c * z);
}

static double act_grad_ref(double z, int kind, double c) {
    return kind == 1 ? 1 - std::tanh(z) * std::tanh(z) : (z > 0 ? 1 : c);
}

template <typename T>
static std::vector<T> random(size_t n, std::mt19937 &rng) {
    std::normal_distribution<double> normal(0, 1);
    std::vector<T> v(n);
    for (auto &e : v) {
        e = static_cast<T>(normal(rng));
    }
    return v;
}

static std::vector<double> widen(const std::vector<float> &v) { return {v.begin(), v.end()}; }
static std::vector<double> widen(const std::vector<double> &v) { return v; }

// cuBLAS's gemm as its documentation defines it, column-major:
// C (m x n, ldc) = op(A) op(B) + beta C, op(A) m x kk and op(B) kk x n, each
// transposed when asked.
template <typename T>
static void gemm(bool ta, bool tb, int m, int n, int kk, const T *a, int lda, const T *b, int ldb,
                 T beta, T *c, int ldc) {
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
            T acc = T(0);
            for (int l = 0; l < kk; ++l) {
                const T av = ta ? a[l + (long)i * lda] : a[i + (long)l * lda];
                const T bv = tb ? b[j + (long)l * ldb] : b[l + (long)j * ldb];
                acc += av * bv;
            }
            c[i + (long)j * ldc] = acc + beta * c[i + (long)j * ldc];
        }
    }
}

// The layers of networks of any shape, each against a double-precision reference:
// the products with the arguments `Product` in src/mlp/cuda.rs gives cuBLAS, then the
// kernels around them; the forward layer with and without a residual input and an
// activation, the input gradient with and without the activation's derivative and an
// addend, the weight and bias gradients added to what is there, and the activation.
template <typename T>
static double check_layers(int rows, int k, int n, int kind, double c) {
    std::mt19937 rng(11 + rows + k + n);
    const unsigned threads = 128;
    const T tc = T(c);
    auto h = random<T>((size_t)rows * k, rng), p = random<T>((size_t)n * (k + 1), rng);
    auto add = random<T>((size_t)rows * n, rng), dz = random<T>((size_t)rows * n, rng);
    auto zin = random<T>((size_t)rows * k, rng);
    double worst = 0;
    auto grid = [&](long total) { return dim3{unsigned((total + threads - 1) / threads), 1}; };

    // Forward, with and without `add` and `y`.
    for (int with = 0; with < 2; ++with) {
        std::vector<double> zr((size_t)rows * n), yr((size_t)rows * n);
        for (int r = 0; r < rows; ++r) {
            for (int j = 0; j < n; ++j) {
                double acc = p[(size_t)j * (k + 1) + k];
                for (int i = 0; i < k; ++i) {
                    acc += double(p[(size_t)j * (k + 1) + i]) * h[(size_t)r * k + i];
                }
                acc += with ? double(add[(size_t)r * n + j]) : 0;
                zr[(size_t)r * n + j] = acc;
                yr[(size_t)r * n + j] = act_ref(acc, kind, c);
            }
        }
        std::vector<T> z((size_t)rows * n, T(-999)), y((size_t)rows * n, T(-999));
        gemm<T>(true, false, n, rows, k, p.data(), k + 1, h.data(), k, T(0), z.data(), n);
        launch(grid((long)rows * n), {threads, 1}, [&] {
            linear_epilogue<T>(z.data(), p.data(), with ? add.data() : nullptr,
                               with ? y.data() : nullptr, rows, k, n, kind, tc);
        });
        worst = std::max(worst, rel_err(widen(z).data(), zr));
        if (with) {
            worst = std::max(worst, rel_err(widen(y).data(), yr));
        }
    }

    // Input gradient: plain, and times act'(z) plus an addend.
    for (int with = 0; with < 2; ++with) {
        std::vector<T> yin(zin.size());
        for (size_t e = 0; e < zin.size(); ++e) {
            yin[e] = T(act_ref(zin[e], kind, c));
        }
        std::vector<double> gr((size_t)rows * k);
        const auto addend = random<T>((size_t)rows * k, rng);
        std::vector<T> g((size_t)rows * k, T(-999));
        for (int r = 0; r < rows; ++r) {
            for (int i = 0; i < k; ++i) {
                double acc = 0;
                for (int j = 0; j < n; ++j) {
                    acc += double(dz[(size_t)r * n + j]) * p[(size_t)j * (k + 1) + i];
                }
                const size_t e = (size_t)r * k + i;
                gr[e] = with ? acc * act_grad_ref(zin[e], kind, c) + double(addend[e]) : acc;
            }
        }
        gemm<T>(false, false, k, rows, n, p.data(), k + 1, dz.data(), n, T(0), g.data(), k);
        launch(grid((long)rows * k), {threads, 1}, [&] {
            input_epilogue<T>(g.data(), with ? zin.data() : nullptr, with ? yin.data() : nullptr,
                              with ? addend.data() : nullptr, rows, k, kind, tc);
        });
        worst = std::max(worst, rel_err(widen(g).data(), gr));
    }

    // Weight and bias gradients, added to what is there.
    auto gp = random<T>((size_t)n * (k + 1), rng);
    std::vector<double> gpr = widen(gp);
    for (int r = 0; r < rows; ++r) {
        for (int j = 0; j < n; ++j) {
            for (int i = 0; i <= k; ++i) {
                gpr[(size_t)j * (k + 1) + i] +=
                    double(dz[(size_t)r * n + j]) * (i < k ? double(h[(size_t)r * k + i]) : 1.0);
            }
        }
    }
    gemm<T>(false, true, k, n, rows, h.data(), k, dz.data(), n, T(1), gp.data(), k + 1);
    launch(grid(n), {threads, 1}, [&] { bias_grad<T>(dz.data(), gp.data(), rows, k, n); });
    worst = std::max(worst, rel_err(widen(gp).data(), gpr));

    // The activation alone.
    std::vector<T> ya(zin.size(), T(-999));
    std::vector<double> yar(zin.size());
    for (size_t e = 0; e < zin.size(); ++e) {
        yar[e] = act_ref(zin[e], kind, c);
    }
    launch(grid((long long)zin.size()), {threads, 1}, [&] {
        activate<T>(zin.data(), ya.data(), (long long)zin.size(), kind, tc);
    });
    return std::max(worst, rel_err(widen(ya).data(), yar));
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
    // (rows, k, n) of single layers of any shape: thin and wide inputs and outputs,
    // partial blocks and chunks, one row.
    const int layers[][3] = {{1, 1, 64}, {70, 40, 24}, {9, 300, 3}, {5, 4, 300}, {130, 17, 9}};
    for (const auto &l : layers) {
        for (int kind = 0; kind < 2; ++kind) {
            const double c = kind == 0 ? 0.01 : 0.0;
            const double e32 = check_layers<float>(l[0], l[1], l[2], kind, c);
            const double e64 = check_layers<double>(l[0], l[1], l[2], kind, c);
            const bool pass = e32 < 1e-5 && e64 < 1e-12;
            ok = ok && pass;
            std::printf("%s layer rows %d in %d out %d %s: f32 %.1e, f64 %.1e\n",
                        pass ? "ok  " : "FAIL", l[0], l[1], l[2],
                        kind == 0 ? "leaky-relu" : "tanh", e32, e64);
        }
    }
    return ok ? 0 : 1;
}
