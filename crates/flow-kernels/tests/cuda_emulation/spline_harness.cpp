// Runs the CUDA spline kernels of src/spline/spline.cu on the CPU (one thread per row,
// no warp-level operations, so threads run one after another) and checks them against
// an independent double-precision implementation: the spline written from its
// definition, its inverse by bisection, and gradients by central differences. Built
// and run by tests/cuda_kernels.rs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "threads.hpp"
using std::exp;
using std::fabs;
using std::fmax;
using std::log;
using std::log1p;
using std::sqrt;

#include "spline.cu"

// The reference: one element's spline from its raw parameters, in double.
struct Reference {
    int bins, style;
    double bound, min_w, min_h, min_d;

    double clip(double v, double f) const { return v / (1 + fabs(f / log(min_d)) * fabs(v)); }

    std::vector<double> at(const double *raw, double min) const {
        std::vector<double> e(bins), pos(bins + 1);
        double m = -INFINITY, sum = 0;
        for (int i = 0; i < bins; ++i) m = std::max(m, style ? clip(raw[i], 2) : raw[i]);
        for (int i = 0; i < bins; ++i) sum += e[i] = exp((style ? clip(raw[i], 2) : raw[i]) - m);
        pos[0] = -bound;
        double acc = 0;
        for (int i = 0; i + 1 < bins; ++i) {
            const double size = style ? e[i] / sum : min + (1 - min * bins) * e[i] / sum;
            acc += size;
            pos[i + 1] = -bound + 2 * bound * acc;
        }
        pos[bins] = bound;
        return pos;
    }

    // (y, log dy/dx) at x.
    std::pair<double, double> forward(double x, const double *th) const {
        if (!(x >= -bound && x <= bound)) return {x, 0};
        auto xs = at(th, min_w), ys = at(th + bins, min_h);
        std::vector<double> d(bins + 1, 1.0);
        for (int j = 1; j < bins; ++j) {
            const double r = th[2 * bins + j - 1];
            d[j] = style ? exp(clip(r, 1)) : log1p(exp(r)) + min_d;
        }
        int k = 0;
        while (k < bins - 1 && xs[k + 1] <= x) ++k;
        const double w = xs[k + 1] - xs[k], h = ys[k + 1] - ys[k], s = h / w;
        const double t = (x - xs[k]) / w;
        const double den = s + (d[k] + d[k + 1] - 2 * s) * t * (1 - t);
        const double y = ys[k] + h * (s * t * t + d[k] * t * (1 - t)) / den;
        const double dydx = s * s * (d[k + 1] * t * t + 2 * s * t * (1 - t) + d[k] * (1 - t) * (1 - t)) /
                            (den * den);
        return {y, log(dydx)};
    }

    // The inverse by bisection: (x, log dx/dy).
    std::pair<double, double> inverse(double y, const double *th) const {
        if (!(y >= -bound && y <= bound)) return {y, 0};
        double lo = -bound, hi = bound;
        for (int i = 0; i < 200; ++i) {
            const double mid = 0.5 * (lo + hi);
            (forward(mid, th).first < y ? lo : hi) = mid;
        }
        const double x = 0.5 * (lo + hi);
        return {x, -forward(x, th).second};
    }

    std::pair<double, double> apply(double v, const double *th, bool inv) const {
        return inv ? inverse(v, th) : forward(v, th);
    }
};

template <typename T>
static double check(const Reference &ref, bool inverse, std::mt19937 &rng) {
    const int batch = 40, n = 3, p = 3 * ref.bins - 1;
    std::normal_distribution<double> normal(0.0, 1.0);
    std::vector<T> x(batch * n), theta(batch * n * p), g(batch * (n + 1));
    for (auto &v : x) v = T(normal(rng) * ref.bound * 0.7);
    for (auto &v : theta) v = T(normal(rng) * 1.5);
    for (auto &v : g) v = T(normal(rng));
    x[0] = T(1e6);  // far in a tail
    x[1] = T(-2 * ref.bound);
    const SplineArgs a{ref.bins, ref.style, ref.bound, ref.min_w, ref.min_h, ref.min_d};

    std::vector<T> out(batch * (n + 1)), grad(batch * (n + n * p), T(0));
    blockDim.x = 1;
    for (int r = 0; r < batch; ++r) {
        blockIdx.x = r;
        threadIdx.x = 0;
        spline_forward<T>(x.data(), theta.data(), out.data(), batch, n, a, inverse);
        spline_backward<T>(x.data(), theta.data(), g.data(), grad.data(), batch, n, a, inverse);
    }

    double worst = 0;
    auto note = [&](double got, double want, double scale) {
        worst = std::max(worst, fabs(got - want) / (1 + fabs(scale)));
    };
    std::vector<double> th(p);
    for (int r = 0; r < batch; ++r) {
        double total = 0;
        for (int j = 0; j < n; ++j) {
            const int e = r * n + j;
            for (int i = 0; i < p; ++i) th[i] = double(theta[e * p + i]);
            const double v = double(x[e]);
            auto [y, ld] = ref.apply(v, th.data(), inverse);
            note(double(out[r * (n + 1) + j]), y, y);
            total += ld;
            // The gradient of g_y y + g_l ld, by central differences of the reference.
            const double gy = double(g[r * (n + 1) + j]), gl = double(g[r * (n + 1) + n]);
            auto objective = [&](double vv, const double *tt) {
                auto [yy, ll] = ref.apply(vv, tt, inverse);
                return gy * yy + gl * ll;
            };
            const double h = 1e-6 * std::max(1.0, fabs(v));
            const double gx = (objective(v + h, th.data()) - objective(v - h, th.data())) / (2 * h);
            const T *kg = grad.data() + r * (n + n * p);
            note(double(kg[j]), gx, gx);
            for (int i = 0; i < p; ++i) {
                std::vector<double> up = th, down = th;
                up[i] += 1e-6;
                down[i] -= 1e-6;
                const double gt = (objective(v, up.data()) - objective(v, down.data())) / 2e-6;
                note(double(kg[n + j * p + i]), gt, gt);
            }
        }
        note(double(out[r * (n + 1) + n]), total, total);
    }
    return worst;
}

int main() {
    std::mt19937 rng(7);
    bool ok = true;
    // (bins, style, bound)
    const int cases[][2] = {{8, 0}, {8, 1}, {1, 0}, {5, 1}, {MAX_BINS, 0}};
    const double bounds[] = {3.0, 5.0, 2.0, 4.0, 3.0};
    for (int c = 0; c < 5; ++c) {
        const Reference ref{cases[c][0], cases[c][1], bounds[c], 1e-3, 1e-3, 1e-3};
        for (int inverse = 0; inverse < 2; ++inverse) {
            const double e32 = check<float>(ref, inverse, rng);
            const double e64 = check<double>(ref, inverse, rng);
            // Central differences in double are good to about 1e-7; the same code in
            // f32 carries f32's rounding through steep, narrow bins (the inverse's
            // gradients divide by the slope).
            const bool pass = e32 < 2e-2 && e64 < 1e-5;
            ok = ok && pass;
            std::printf("spline bins %d style %d bound %.0f %s: f32 %.1e, f64 %.1e %s\n",
                        ref.bins, ref.style, ref.bound, inverse ? "inverse" : "forward", e32,
                        e64, pass ? "ok" : "FAILED");
        }
    }
    return ok ? 0 : 1;
}
