// Runs the one-launch optimiser kernel of src/adam/adam.cu on the CPU (it uses no
// warp-level operations and no thread reads another's elements, so blocks and threads
// run one after another) and checks it against Adam, AdamW and Adamax written from
// their definitions in double precision, over several steps and over variables whose
// lengths fall on and beside the chunk boundaries. Built and run by
// tests/cuda_kernels.rs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "threads.hpp"
using std::sqrt;

#include "adam.cu"

struct Optimiser {
    const char *name;
    double lr, beta1, beta2, eps, weight_decay;
    bool decoupled, adamax;
};

// One variable's state, in the kernel's precision and in the reference's.
template <typename T>
struct Variable {
    std::vector<T> theta, m, v, g;
    std::vector<double> ref_theta, ref_m, ref_v;
};

// The reference step, from the definitions: L2 decay adds λθ to the gradient, AdamW
// shrinks θ by lr·λ, Adamax keeps the infinity norm max(β₂u, |g| + ε).
static void reference_step(const Optimiser &o, int t, std::vector<double> &theta,
                           std::vector<double> &m, std::vector<double> &v,
                           const std::vector<double> &g) {
    for (size_t i = 0; i < theta.size(); ++i) {
        const double grad = g[i] + (o.decoupled ? 0.0 : o.weight_decay * theta[i]);
        m[i] = o.beta1 * m[i] + (1 - o.beta1) * grad;
        const double m_hat = m[i] / (1 - std::pow(o.beta1, t));
        double step;
        if (o.adamax) {
            v[i] = std::max(o.beta2 * v[i], std::fabs(grad) + o.eps);
            step = o.lr * m_hat / v[i];
        } else {
            v[i] = o.beta2 * v[i] + (1 - o.beta2) * grad * grad;
            const double v_hat = v[i] / (1 - std::pow(o.beta2, t));
            step = o.lr * m_hat / (std::sqrt(v_hat) + o.eps);
        }
        const double shrink = o.decoupled ? 1 - o.lr * o.weight_decay : 1.0;
        theta[i] = shrink * theta[i] - step;
    }
}

// Largest difference relative to the largest magnitude (at least 1).
template <typename T>
static double rel_err(const std::vector<T> &a, const std::vector<double> &b) {
    double diff = 0, scale = 1;
    for (size_t i = 0; i < b.size(); ++i) {
        diff = std::max(diff, std::fabs(double(a[i]) - b[i]));
        scale = std::max(scale, std::fabs(b[i]));
    }
    return diff / scale;
}

// Three steps of `o` over variables of `lengths`, launched as the Rust side launches
// them: a table of rows, ceil(length / chunk) blocks per variable.
template <typename T>
static double check(const Optimiser &o, const std::vector<long long> &lengths, long long chunk,
                    unsigned threads) {
    std::mt19937 rng(11);
    std::normal_distribution<double> normal(0, 1);
    std::vector<Variable<T>> vars(lengths.size());
    for (size_t k = 0; k < lengths.size(); ++k) {
        auto &var = vars[k];
        const size_t n = lengths[k];
        var.theta.resize(n);
        var.m.assign(n, T(0));
        var.v.assign(n, T(0));
        var.g.resize(n);
        for (auto &e : var.theta) e = T(normal(rng));
        var.ref_theta.assign(var.theta.begin(), var.theta.end());
        var.ref_m.assign(n, 0);
        var.ref_v.assign(n, 0);
    }
    for (int t = 1; t <= 3; ++t) {
        std::vector<unsigned long long> table;
        unsigned long long blocks = 0;
        for (auto &var : vars) {
            for (auto &e : var.g) e = T(normal(rng));
            table.insert(table.end(), {reinterpret_cast<unsigned long long>(var.theta.data()),
                                       reinterpret_cast<unsigned long long>(var.m.data()),
                                       reinterpret_cast<unsigned long long>(var.v.data()),
                                       reinterpret_cast<unsigned long long>(var.g.data()),
                                       static_cast<unsigned long long>(var.theta.size()),
                                       blocks});
            blocks += (var.theta.size() + chunk - 1) / chunk;
        }
        const double alpha = o.lr / (1 - std::pow(o.beta1, t));
        const double kappa = 1 / (1 - std::pow(o.beta2, t));
        const double l2 = o.decoupled ? 0 : o.weight_decay;
        const double decay = o.decoupled ? o.lr * o.weight_decay : 0;
        blockDim.x = threads;
        for (unsigned long long b = 0; b < blocks; ++b) {
            blockIdx.x = unsigned(b);
            for (unsigned th = 0; th < threads; ++th) {
                threadIdx.x = th;
                adam_multi<T>(table.data(), int(vars.size()), chunk, o.beta1, o.beta2, l2,
                              alpha, kappa, o.eps, decay, o.adamax ? 1 : 0);
            }
        }
        for (auto &var : vars) {
            std::vector<double> g(var.g.begin(), var.g.end());
            reference_step(o, t, var.ref_theta, var.ref_m, var.ref_v, g);
        }
    }
    double err = 0;
    for (auto &var : vars) {
        err = std::max({err, rel_err(var.theta, var.ref_theta), rel_err(var.m, var.ref_m),
                        rel_err(var.v, var.ref_v)});
    }
    return err;
}

int main() {
    const Optimiser optimisers[] = {
        {"adam", 1e-2, 0.9, 0.999, 1e-8, 0.0, false, false},
        {"adam, L2 decay", 1e-2, 0.9, 0.999, 1e-8, 0.1, false, false},
        {"adamw", 1e-2, 0.9, 0.999, 1e-8, 0.1, true, false},
        {"adamax", 2e-3, 0.9, 0.999, 1e-8, 0.0, false, true},
    };
    const long long chunk = 64;
    // Lengths on, beside and far from the chunk boundaries, and a single element.
    const std::vector<long long> lengths = {1, 63, 64, 65, 200, 3, 129};
    bool ok = true;
    for (const auto &o : optimisers) {
        const double e32 = check<float>(o, lengths, chunk, 32);
        const double e64 = check<double>(o, lengths, chunk, 32);
        const bool pass = e32 < 1e-5 && e64 < 1e-12;
        ok = ok && pass;
        std::printf("%-16s f32 %.2e  f64 %.2e  %s\n", o.name, e32, e64, pass ? "ok" : "FAIL");
    }
    return ok ? 0 : 1;
}
