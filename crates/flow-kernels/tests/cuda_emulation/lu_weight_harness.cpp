// Runs the kernels of src/lu_weight/lu_weight.cu on the CPU (one writer per output, so
// threads run one after another), launched as cuda.rs launches them, and checks the
// weight W = P·L·(U + diag(sign·exp(log_s))) against the matrices built from their
// definition and multiplied in double, and the gradients of a weighted sum of W's
// entries against central differences in every entry of l, u and log_s (zero for the
// triangles the weight does not use). P a permutation and a general matrix; f64 within
// 1e-8 of the differences, f32 within 1e-5 of f64. Built and run by
// tests/cuda_kernels.rs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "threads.hpp"
using std::exp;

#include "lu_weight.cu"

// As cuda.rs: threads per block.
static const unsigned THREADS = 128;

struct Params {
    int c;
    std::vector<double> p, l, u, log_s, sign;
};

// W from the definition: the factors as full matrices, then two products.
static std::vector<double> reference(const Params &q) {
    const int c = q.c;
    std::vector<double> lt(c * c, 0), ut(c * c, 0), m(c * c, 0), w(c * c, 0);
    for (int i = 0; i < c; ++i) {
        for (int j = 0; j < c; ++j) {
            lt[i * c + j] = i > j ? q.l[i * c + j] : (i == j ? 1 : 0);
            ut[i * c + j] = i < j ? q.u[i * c + j] : (i == j ? q.sign[j] * std::exp(q.log_s[j]) : 0);
        }
    }
    for (int i = 0; i < c; ++i)
        for (int k = 0; k < c; ++k)
            for (int j = 0; j < c; ++j) m[i * c + j] += lt[i * c + k] * ut[k * c + j];
    for (int i = 0; i < c; ++i)
        for (int k = 0; k < c; ++k)
            for (int j = 0; j < c; ++j) w[i * c + j] += q.p[i * c + k] * m[k * c + j];
    return w;
}

template <typename T>
static std::vector<T> cast(const std::vector<double> &v) {
    return std::vector<T>(v.begin(), v.end());
}

template <typename T>
static std::vector<T> forward(const Params &q) {
    const auto p = cast<T>(q.p), l = cast<T>(q.l), u = cast<T>(q.u), s = cast<T>(q.log_s),
               sign = cast<T>(q.sign);
    std::vector<T> w(q.c * q.c, T(NAN));
    launch_each(w.size(), THREADS, [&] {
        lu_weight_forward<T>(p.data(), l.data(), u.data(), s.data(), sign.data(), w.data(), q.c);
    });
    return w;
}

template <typename T>
static std::vector<T> backward(const Params &q, const std::vector<double> &g) {
    const auto p = cast<T>(q.p), l = cast<T>(q.l), u = cast<T>(q.u), s = cast<T>(q.log_s),
               sign = cast<T>(q.sign), gt = cast<T>(g);
    std::vector<T> out(2 * q.c * q.c + q.c, T(NAN));
    launch_each(out.size(), THREADS, [&] {
        lu_weight_backward<T>(p.data(), l.data(), u.data(), s.data(), sign.data(), gt.data(),
                              out.data(), q.c);
    });
    return out;
}

static int failures = 0;
static double worst = 0;

static void expect(const char *what, int c, bool perm, double got, double want, double tol) {
    const double err = std::fabs(got - want) / std::max(1.0, std::fabs(want));
    worst = std::max(worst, err);
    if (!(err <= tol)) {
        if (++failures <= 10) {
            std::printf("%s (c %d, %s P): %.10g, want %.10g\n", what, c,
                        perm ? "permutation" : "general", got, want);
        }
    }
}

int main() {
    std::mt19937 rng(5);
    std::uniform_real_distribution<double> u(-1, 1);
    int cases = 0;
    for (int c : {1, 2, 5, 9}) {
        for (bool perm : {true, false}) {
            ++cases;
            Params q{c, std::vector<double>(c * c, 0), std::vector<double>(c * c),
                     std::vector<double>(c * c), std::vector<double>(c), std::vector<double>(c)};
            for (auto *v : {&q.l, &q.u, &q.log_s})
                for (double &e : *v) e = u(rng);
            for (int j = 0; j < c; ++j) q.sign[j] = u(rng) < 0 ? -1 : 1;
            if (perm) {
                // The reversal: not the identity wherever c > 1.
                for (int i = 0; i < c; ++i) q.p[i * c + (c - 1 - i)] = 1;
            } else {
                for (double &e : q.p) e = u(rng);
            }
            std::vector<double> r(c * c);
            for (double &e : r) e = u(rng);

            const auto want = reference(q);
            const auto w = forward<double>(q);
            const auto w32 = forward<float>(q);
            for (int i = 0; i < c * c; ++i) {
                expect("W f64", c, perm, w[i], want[i], 1e-13);
                expect("W f32", c, perm, w32[i], want[i], 1e-5);
            }

            const auto g = backward<double>(q, r);
            const auto g32 = backward<float>(q, r);
            const double eps = 1e-6;
            auto loss = [&] {
                const auto ww = reference(q);
                double sum = 0;
                for (int i = 0; i < c * c; ++i) sum += r[i] * ww[i];
                return sum;
            };
            auto check = [&](const char *what, std::vector<double> &v, int at) {
                for (size_t i = 0; i < v.size(); ++i) {
                    const double keep = v[i];
                    v[i] = keep + eps;
                    const double up = loss();
                    v[i] = keep - eps;
                    const double down = loss();
                    v[i] = keep;
                    const double fd = (up - down) / (2 * eps);
                    expect(what, c, perm, g[at + i], fd, 1e-8);
                    expect(what, c, perm, g32[at + i], g[at + i], 1e-5);
                }
            };
            check("dl", q.l, 0);
            check("du", q.u, c * c);
            check("dlog_s", q.log_s, 2 * c * c);
        }
    }
    std::printf("LU weight kernels: %d cases, worst relative error %.3g, %d failures\n", cases,
                worst, failures);
    return failures == 0 ? 0 : 1;
}
