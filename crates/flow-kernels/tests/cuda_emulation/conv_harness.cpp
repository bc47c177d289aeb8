// Runs the convolution kernels of src/conv/conv.cu on the CPU (one writer per output,
// so threads run one after another), composed with plain row-major products where the
// op calls cuBLAS (the products' mapping onto cuBLAS is tested in product.rs), and
// checks the whole op against a convolution written from its definition in double:
// the output for every activation, with and without a bias, and the gradients of a
// weighted sum of the outputs against central differences. f64 within 1e-7 (the
// differences' error), f32 within 1e-4 of the f64 reference. Built and run by
// tests/cuda_kernels.rs.
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "threads.hpp"
using std::tanh;

#include "conv.cu"

struct Shape {
    int batch, cin, cout, h, w, k;
    long long pixels() const { return (long long)h * w; }
    long long positions() const { return batch * pixels(); }
    long long patch() const { return (long long)cin * k * k; }
    long long nx() const { return batch * cin * pixels(); }
    long long nw() const { return cout * patch(); }
    long long ny() const { return batch * cout * pixels(); }
};

// C (m × n) = op(A)·op(B), row-major, A (m × k) or (k × m) when `at`, B (k × n) or
// (n × k) when `bt`: what each cuBLAS call of cuda.rs computes.
template <typename T>
static void product(long long m, long long n, long long k, bool at, bool bt,
                    const std::vector<T> &a, const std::vector<T> &b, T *c) {
    for (long long i = 0; i < m; ++i) {
        for (long long j = 0; j < n; ++j) {
            T acc = T(0);
            for (long long l = 0; l < k; ++l) {
                acc += (at ? a[l * m + i] : a[i * k + l]) * (bt ? b[j * k + l] : b[l * n + j]);
            }
            c[i * n + j] = acc;
        }
    }
}

// The op's forward as cuda.rs runs it.
template <typename T>
static std::vector<T> forward(const Shape &s, const std::vector<T> &x, const std::vector<T> &w,
                              const T *bias, int kind, double slope) {
    std::vector<T> cols(s.positions() * s.patch(), T(NAN));
    launch_each(cols.size(), 64, [&] { conv_im2col<T>(x.data(), cols.data(), s.batch, s.cin, s.h, s.w, s.k); });
    std::vector<T> z(s.positions() * s.cout, T(NAN));
    product<T>(s.positions(), s.cout, s.patch(), false, true, cols, w, z.data());
    std::vector<T> y(s.ny(), T(NAN));
    launch_each(y.size(), 64, [&] {
        conv_epilogue<T>(z.data(), bias, y.data(), s.batch, s.cout, s.pixels(), kind, slope);
    });
    return y;
}

// The op's backward as cuda.rs runs it: [∂x | ∂W | ∂b] from the output's gradient g.
template <typename T>
static std::vector<T> backward(const Shape &s, const std::vector<T> &x, const std::vector<T> &w,
                               const std::vector<T> &y, const std::vector<T> &g, int kind,
                               double slope) {
    std::vector<T> dz(s.ny(), T(NAN));
    if (kind == 0) {
        dz = g;
    } else {
        launch_each(dz.size(), 64, [&] {
            conv_activation_grad<T>(g.data(), y.data(), dz.data(), s.ny(), kind, slope);
        });
    }
    std::vector<T> out(s.nx() + s.nw() + s.cout, T(NAN));
    std::vector<T> dzp(s.ny(), T(NAN));
    launch_each(dzp.size(), 64, [&] { conv_to_positions<T>(dz.data(), dzp.data(), s.batch, s.cout, s.pixels()); });
    std::vector<T> cols(s.positions() * s.patch(), T(NAN));
    launch_each(cols.size(), 64, [&] { conv_im2col<T>(x.data(), cols.data(), s.batch, s.cin, s.h, s.w, s.k); });
    product<T>(s.cout, s.patch(), s.positions(), true, false, dzp, cols, out.data() + s.nx());
    // Slices of 7 rows rather than cuda.rs's 64, so that these small images' positions
    // span several slices and end in a partial one.
    const int slice = 7;
    const long long slices = (s.positions() + slice - 1) / slice;
    std::vector<T> partials(slices * s.cout, T(NAN));
    launch_each(partials.size(), 64, [&] { conv_bias_partials<T>(dzp.data(), partials.data(), s.positions(), s.cout, slice); });
    launch_each(s.cout, 64, [&] { conv_bias_finish<T>(partials.data(), out.data() + s.nx() + s.nw(), slices, s.cout); });
    product<T>(s.positions(), s.patch(), s.cout, false, false, dzp, w, cols.data());
    launch_each(s.nx(), 64, [&] { conv_col2im<T>(cols.data(), out.data(), s.batch, s.cin, s.h, s.w, s.k); });
    return out;
}

// The convolution from its definition, in double.
static std::vector<double> reference(const Shape &s, const std::vector<double> &x,
                                     const std::vector<double> &w, const double *bias, int kind,
                                     double slope) {
    std::vector<double> y(s.ny());
    const int p = s.k / 2;
    for (int b = 0; b < s.batch; ++b)
        for (int co = 0; co < s.cout; ++co)
            for (int i = 0; i < s.h; ++i)
                for (int j = 0; j < s.w; ++j) {
                    double v = bias ? bias[co] : 0.0;
                    for (int ci = 0; ci < s.cin; ++ci)
                        for (int ky = 0; ky < s.k; ++ky)
                            for (int kx = 0; kx < s.k; ++kx) {
                                const int yy = i + ky - p, xx = j + kx - p;
                                if (yy < 0 || yy >= s.h || xx < 0 || xx >= s.w) continue;
                                v += w[((co * s.cin + ci) * s.k + ky) * s.k + kx] *
                                     x[((b * s.cin + ci) * s.h + yy) * s.w + xx];
                            }
                    if (kind == 1) v = v > 0 ? v : slope * v;
                    if (kind == 2) v = std::tanh(v);
                    y[((b * s.cout + co) * s.h + i) * s.w + j] = v;
                }
    return y;
}

template <typename T>
static std::vector<T> cast(const std::vector<double> &v) {
    return std::vector<T>(v.begin(), v.end());
}

static double worst = 0;
static int failures = 0;

static void expect(const char *what, const Shape &s, int kind, bool bias, double got, double want,
                   double tol) {
    const double err = std::fabs(got - want) / (1 + std::fabs(want));
    if (err > worst) worst = err;
    if (!(err <= tol)) {
        if (failures++ < 10) {
            std::printf("FAIL %s (%d,%d,%d,%d,%d,k%d) kind %d bias %d: %.9g vs %.9g\n", what,
                        s.batch, s.cin, s.cout, s.h, s.w, s.k, kind, bias, got, want);
        }
    }
}

int main() {
    std::mt19937_64 rng(7);
    std::uniform_real_distribution<double> u(-1, 1);
    const Shape shapes[] = {{2, 3, 4, 5, 4, 3}, {1, 1, 1, 1, 1, 3}, {3, 2, 5, 1, 6, 3},
                            {2, 4, 3, 3, 3, 1}, {1, 2, 2, 6, 5, 5}, {2, 5, 1, 4, 4, 3}};
    const struct {
        int kind;
        double slope;
    } acts[] = {{0, 0.0}, {1, 0.0}, {1, 0.01}, {2, 0.0}};
    int cases = 0;
    for (const Shape &s : shapes) {
        for (const auto &a : acts) {
            for (bool with_bias : {false, true}) {
                ++cases;
                std::vector<double> x(s.nx()), w(s.nw()), bias(s.cout), r(s.ny());
                for (auto *v : {&x, &w, &bias, &r})
                    for (double &e : *v) e = u(rng);
                const double *bp = with_bias ? bias.data() : nullptr;
                const auto want = reference(s, x, w, bp, a.kind, a.slope);

                // Values, f64 and f32.
                const auto y = forward<double>(s, x, w, bp, a.kind, a.slope);
                const auto fb = cast<float>(bias);
                const auto y32 = forward<float>(s, cast<float>(x), cast<float>(w),
                                                with_bias ? fb.data() : nullptr, a.kind, a.slope);
                for (long long i = 0; i < s.ny(); ++i) {
                    expect("y f64", s, a.kind, with_bias, y[i], want[i], 1e-12);
                    expect("y f32", s, a.kind, with_bias, y32[i], want[i], 1e-5);
                }

                // Gradients of L = Σ r ⊙ y against central differences.
                const auto g = backward<double>(s, x, w, y, r, a.kind, a.slope);
                const auto g32 = backward<float>(s, cast<float>(x), cast<float>(w), y32,
                                                 cast<float>(r), a.kind, a.slope);
                auto loss = [&](const std::vector<double> &xx, const std::vector<double> &ww,
                                const std::vector<double> &bb) {
                    const auto yy = reference(s, xx, ww, with_bias ? bb.data() : nullptr, a.kind,
                                              a.slope);
                    double l = 0;
                    for (long long i = 0; i < s.ny(); ++i) l += r[i] * yy[i];
                    return l;
                };
                const double eps = 1e-6;
                auto check = [&](const char *what, std::vector<double> &v, long long at) {
                    for (size_t i = 0; i < v.size(); ++i) {
                        const double keep = v[i];
                        v[i] = keep + eps;
                        const double up = loss(x, w, bias);
                        v[i] = keep - eps;
                        const double down = loss(x, w, bias);
                        v[i] = keep;
                        const double fd = (up - down) / (2 * eps);
                        expect(what, s, a.kind, with_bias, g[at + i], fd, 1e-7);
                        expect(what, s, a.kind, with_bias, g32[at + i], g[at + i], 1e-4);
                    }
                };
                check("dx", x, 0);
                check("dw", w, s.nx());
                if (with_bias) check("db", bias, s.nx() + s.nw());
            }
        }
    }
    std::printf("conv kernels: %d cases, worst relative error %.3g, %d failures\n", cases, worst,
                failures);
    return failures == 0 ? 0 : 1;
}
