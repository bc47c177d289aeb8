// Runs the affine coupling kernels of src/affine/affine.cu on the CPU (no warp-level
// operations and one writer per output, so threads run one after another) and checks
// them against a double-precision reference written from the definitions: every scale
// map, both directions, a round trip, and the gradients of a weighted sum of the
// outputs and log-dets against central differences. Built and run by
// tests/cuda_kernels.rs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "threads.hpp"
using std::atan;
using std::exp;
using std::log;
using std::log1p;
using std::tanh;

#include "affine.cu"

// The log-scale from its definition.
static double log_scale(double s, int kind, double c) {
    switch (kind) {
    case 1: return s / (1 + std::fabs(s) / c);
    case 2: return c * std::tanh(s / c);
    case 3: return 0.636 * c * std::atan(s);
    case 4: return std::log(1 / (1 + std::exp(-(s + 2))) + 1e-3);
    case 5: return std::log(std::log(1 + std::exp(s)) + 1e-3);
    default: return s;
    }
}

struct Case {
    int batch, dim, kind;
    double clamp;
    std::vector<int> column;  // -1: copied through
    int n;
    bool shift_first = false;  // (x + t)·exp(ŝ) rather than x·exp(ŝ) + t
};

// The reference: y and log-det of one coupling, in double.
static void reference(const Case &c, bool inverse, const std::vector<double> &x,
                      const std::vector<double> &s, const std::vector<double> &t,
                      std::vector<double> &y, std::vector<double> &ld) {
    y = x;
    ld.assign(c.batch, 0);
    for (int b = 0; b < c.batch; ++b) {
        for (int d = 0; d < c.dim; ++d) {
            const int j = c.column[d];
            if (j < 0) continue;
            const double ls = log_scale(s[b * c.n + j], c.kind, c.clamp);
            const double v = x[b * c.dim + d], sh = t[b * c.n + j];
            if (c.shift_first) {
                y[b * c.dim + d] = inverse ? v * std::exp(-ls) - sh : (v + sh) * std::exp(ls);
            } else {
                y[b * c.dim + d] = inverse ? (v - sh) * std::exp(-ls) : v * std::exp(ls) + sh;
            }
            ld[b] += inverse ? -ls : ls;
        }
    }
}

// The kernels' y, log-det and gradients [∂x | ∂s | ∂t] of L = Σ wy·y + Σ wl·log-det.
template <typename T>
static void kernels(const Case &c, bool inverse, const std::vector<double> &x,
                    const std::vector<double> &s, const std::vector<double> &t,
                    const std::vector<double> &wy, const std::vector<double> &wl,
                    std::vector<double> &y, std::vector<double> &ld,
                    std::vector<double> &grad) {
    auto cast = [](const std::vector<double> &v) { return std::vector<T>(v.begin(), v.end()); };
    const auto xt = cast(x), st = cast(s), tt = cast(t), gy = cast(wy), gl = cast(wl);
    const long long elems = (long long)c.batch * c.dim, params = (long long)c.batch * c.n;
    std::vector<T> yt(elems), ldt(c.batch), packed(elems + 2 * params), gls(params);
    const int inv = inverse ? 1 : 0, sf = c.shift_first ? 1 : 0;
    launch_each(elems, 64, [&] {
        affine_update<T>(xt.data(), st.data(), tt.data(), c.column.data(), yt.data(), c.batch,
                         c.dim, c.n, c.kind, c.clamp, inv, sf);
    });
    launch_each(c.batch, 64, [&] {
        affine_log_det<T>(st.data(), ldt.data(), c.batch, c.n, c.kind, c.clamp, inv);
    });
    // The derivative in ŝ needs x going forward and y going back, or the other way
    // round with the shift first.
    const std::vector<T> &xy = inverse != c.shift_first ? yt : xt;
    launch_each(elems, 64, [&] {
        affine_update_grad<T>(xy.data(), st.data(), gy.data(), c.column.data(), packed.data(),
                              c.batch, c.dim, c.n, c.kind, c.clamp, inv, sf);
    });
    launch_each(params, 64, [&] {
        affine_log_det_grad<T>(st.data(), gl.data(), gls.data(), c.batch, c.n, c.kind,
                               c.clamp, inv);
    });
    y.assign(yt.begin(), yt.end());
    ld.assign(ldt.begin(), ldt.end());
    grad.assign(packed.begin(), packed.end());
    for (long long k = 0; k < params; ++k) grad[elems + k] += gls[k];
}

static double rel_err(const std::vector<double> &a, const std::vector<double> &b) {
    double diff = 0, scale = 1;
    for (size_t i = 0; i < b.size(); ++i) {
        diff = std::max(diff, std::fabs(a[i] - b[i]));
        scale = std::max(scale, std::fabs(b[i]));
    }
    return diff / scale;
}

static bool check(const Case &c, const char *name) {
    std::mt19937 rng(5);
    std::normal_distribution<double> normal(0, 1);
    auto draw = [&](size_t n) {
        std::vector<double> v(n);
        for (auto &e : v) e = normal(rng);
        return v;
    };
    const auto x = draw(c.batch * c.dim), s = draw(c.batch * c.n), t = draw(c.batch * c.n);
    const auto wy = draw(c.batch * c.dim), wl = draw(c.batch);
    bool ok = true;
    for (bool inverse : {false, true}) {
        std::vector<double> ry, rl;
        reference(c, inverse, x, s, t, ry, rl);
        // Central differences of L through the reference, in x, then s, then t.
        auto loss = [&](const std::vector<double> &x2, const std::vector<double> &s2,
                        const std::vector<double> &t2) {
            std::vector<double> y2, l2;
            reference(c, inverse, x2, s2, t2, y2, l2);
            double sum = 0;
            for (size_t i = 0; i < y2.size(); ++i) sum += wy[i] * y2[i];
            for (size_t i = 0; i < l2.size(); ++i) sum += wl[i] * l2[i];
            return sum;
        };
        std::vector<double> numeric;
        const double h = 1e-6;
        for (int which = 0; which < 3; ++which) {
            const auto &base = which == 0 ? x : which == 1 ? s : t;
            for (size_t i = 0; i < base.size(); ++i) {
                auto up = base, down = base;
                up[i] += h;
                down[i] -= h;
                const double f_up = which == 0   ? loss(up, s, t)
                                    : which == 1 ? loss(x, up, t)
                                                 : loss(x, s, up);
                const double f_down = which == 0   ? loss(down, s, t)
                                      : which == 1 ? loss(x, down, t)
                                                   : loss(x, s, down);
                numeric.push_back((f_up - f_down) / (2 * h));
            }
        }
        std::vector<double> y64, l64, g64, y32, l32, g32;
        kernels<double>(c, inverse, x, s, t, wy, wl, y64, l64, g64);
        kernels<float>(c, inverse, x, s, t, wy, wl, y32, l32, g32);
        const double e64 = std::max({rel_err(y64, ry), rel_err(l64, rl)});
        const double e32 = std::max({rel_err(y32, ry), rel_err(l32, rl)});
        const double eg64 = rel_err(g64, numeric), eg32 = rel_err(g32, numeric);
        // The inverse undoes the forward map: the kernel's forward output, sent back.
        std::vector<double> back, unused, unused_g;
        if (!inverse) {
            kernels<double>(c, true, y64, s, t, wy, wl, back, unused, unused_g);
        }
        const double round = inverse ? 0 : rel_err(back, x);
        const bool pass = e64 < 1e-12 && e32 < 1e-5 && eg64 < 1e-8 && eg32 < 1e-5 &&
                          round < 1e-12;
        ok = ok && pass;
        std::printf("%-22s %s%s values f64 %.1e f32 %.1e  gradients f64 %.1e f32 %.1e  %s\n",
                    name, c.shift_first ? "shift first, " : "", inverse ? "inverse" : "forward", e64, e32, eg64, eg32,
                    pass ? "ok" : "FAIL");
    }
    return ok;
}

int main() {
    // Half the features transformed in a shuffled order, the rest copied through.
    const std::vector<int> checker = {-1, 0, -1, 2, 1, -1, 3, -1, -1};
    const char *names[] = {"exp", "soft clamp", "tanh", "atan", "sigmoid", "softplus"};
    bool ok = true;
    for (bool shift_first : {false, true}) {
        for (int kind = 0; kind < 6; ++kind) {
            ok = check({5, 9, kind, 1.7, checker, 4, shift_first}, names[kind]) && ok;
        }
        // Every feature transformed, a batch that does not fill a block.
        ok = check({3, 4, 1, 3.0, {3, 2, 1, 0}, 4, shift_first}, "all transformed") && ok;
    }
    return ok ? 0 : 1;
}
