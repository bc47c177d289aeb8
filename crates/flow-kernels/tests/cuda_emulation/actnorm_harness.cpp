// Runs the activation-normalisation kernels of src/actnorm/actnorm.cu on the CPU under
// the emulation of CUDA's threads and warps in warps.hpp (the backward's
// reductions exchange values within warps), launched as cuda.rs launches
// them, and checks the op against its definition in double: the output in both
// directions, and the gradients of a weighted sum of the outputs against central
// differences (every bias and log-scale, a spread of the inputs). Shapes include
// channels split over several blocks, the clamp on blocks per channel, and element
// counts that fill no block. f64 within 1e-8 of the differences, f32 within 1e-5
// of f64. Built and run by tests/cuda_kernels.rs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "warps.hpp"
using std::exp;
#include "actnorm.cu"

// As cuda.rs: threads per block, elements a thread sums at least, blocks per channel
// at most.
static const unsigned THREADS = 256, WARP = 32, PER_THREAD = 8, MAX_BLOCKS = 32;

struct Shape {
    int batch, c;
    long long hw;
    long long n() const { return batch * c * hw; }
};

// y in double from the definition.
static std::vector<double> reference(const Shape &s, const std::vector<double> &x,
                                     const std::vector<double> &b, const std::vector<double> &ls,
                                     bool inverse) {
    std::vector<double> y(s.n());
    for (long long i = 0; i < s.n(); ++i) {
        const int ch = int((i / s.hw) % s.c);
        y[i] = inverse ? x[i] * std::exp(-ls[ch]) - b[ch] : (x[i] + b[ch]) * std::exp(ls[ch]);
    }
    return y;
}

template <typename T>
static std::vector<T> cast(const std::vector<double> &v) {
    return std::vector<T>(v.begin(), v.end());
}

// The op's forward as cuda.rs launches it.
template <typename T>
static std::vector<T> apply(const Shape &s, const std::vector<T> &x, const std::vector<T> &b,
                            const std::vector<T> &ls, bool inverse) {
    std::vector<T> y(s.n(), T(NAN));
    launch_each(s.n(), THREADS, [&] {
        actnorm_apply<T>(x.data(), b.data(), ls.data(), y.data(), s.n(), s.c, s.hw, inverse);
    });
    return y;
}

// [∂x | ∂b | ∂s] as cuda.rs launches the backward, from the output's gradient g and v
// (the output forward, the input inverse).
template <typename T>
static std::vector<T> grad(const Shape &s, const std::vector<T> &g, const std::vector<T> &v,
                           const std::vector<T> &ls, bool inverse) {
    const long long per = s.batch * s.hw;
    const long long want = (per + THREADS * PER_THREAD - 1) / (THREADS * PER_THREAD);
    const unsigned blocks = unsigned(std::clamp<long long>(want, 1, MAX_BLOCKS));
    const int warps = int(blocks * (THREADS / WARP));
    std::vector<T> out(s.n() + 2 * s.c, T(NAN)), partial(s.c * warps * 2, T(NAN));
    launch({unsigned(s.c), blocks}, {THREADS, 1}, [&] {
        actnorm_partials<T>(g.data(), v.data(), ls.data(), out.data(), partial.data(), s.batch,
                            s.c, s.hw, inverse);
    });
    launch({unsigned(s.c), 1}, {WARP, 1}, [&] {
        actnorm_finish<T>(partial.data(), ls.data(), out.data() + s.n(), s.c, warps, inverse);
    });
    return out;
}

static int failures = 0;
static double worst = 0;

static void expect(const char *what, const Shape &s, bool inverse, double got, double want,
                   double tol) {
    const double err = std::fabs(got - want) / std::max(1.0, std::fabs(want));
    worst = std::max(worst, err);
    if (!(err <= tol)) {
        if (++failures <= 10) {
            std::printf("%s (batch %d, c %d, hw %lld, inverse %d): %.10g, want %.10g\n", what,
                        s.batch, s.c, s.hw, int(inverse), got, want);
        }
    }
}

int main() {
    std::mt19937 rng(11);
    std::uniform_real_distribution<double> u(-1, 1);
    const Shape shapes[] = {
        {2, 3, 4},      // less than a block per channel
        {3, 2, 1000},   // two blocks per channel
        {5, 1, 7},      // one channel
        {7, 2, 10000},  // more elements than the blocks' threads: each thread sums several
        {1, 4, 1},      // one value per channel
    };
    int cases = 0;
    for (const Shape &s : shapes) {
        for (bool inverse : {false, true}) {
            ++cases;
            std::vector<double> x(s.n()), b(s.c), ls(s.c), r(s.n());
            for (auto *v : {&x, &b, &ls, &r})
                for (double &e : *v) e = u(rng);
            const auto want = reference(s, x, b, ls, inverse);

            const auto y = apply<double>(s, x, b, ls, inverse);
            const auto y32 = apply<float>(s, cast<float>(x), cast<float>(b), cast<float>(ls), inverse);
            for (long long i = 0; i < s.n(); ++i) {
                expect("y f64", s, inverse, y[i], want[i], 1e-14);
                expect("y f32", s, inverse, y32[i], want[i], 1e-6);
            }

            // Gradients of L = Σ r ⊙ y.
            const auto& v = inverse ? x : y;
            const auto gr = grad<double>(s, r, v, ls, inverse);
            const auto v32 = inverse ? cast<float>(x) : y32;
            const auto gr32 = grad<float>(s, cast<float>(r), v32, cast<float>(ls), inverse);
            // Σ r ⊙ (y(p + ε) − y(p − ε)) / 2ε: the outputs that p does not move cancel
            // exactly, so the differences carry no rounding of the whole sum.
            const double eps = 1e-6;
            auto check = [&](const char *what, std::vector<double> &p, long long at, long long step) {
                for (size_t i = 0; i < p.size(); i += step) {
                    const double keep = p[i];
                    p[i] = keep + eps;
                    const auto up = reference(s, x, b, ls, inverse);
                    p[i] = keep - eps;
                    const auto down = reference(s, x, b, ls, inverse);
                    p[i] = keep;
                    double fd = 0;
                    for (long long j = 0; j < s.n(); ++j) fd += r[j] * (up[j] - down[j]);
                    fd /= 2 * eps;
                    expect(what, s, inverse, gr[at + i], fd, 1e-8);
                    expect(what, s, inverse, gr32[at + i], gr[at + i], 1e-5);
                }
            };
            check("dx", x, 0, std::max<long long>(1, s.n() / 40));
            check("db", b, s.n(), 1);
            check("ds", ls, s.n() + s.c, 1);
        }
    }
    std::printf("actnorm kernels: %d cases, worst relative error %.3g, %d failures\n", cases,
                worst, failures);
    return failures == 0 ? 0 : 1;
}
