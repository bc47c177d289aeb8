// CUDA's thread indices and kernel qualifiers on the CPU, for the harnesses that run the
// kernels of src/*/*.cu as C++. `launch_each` runs a kernel whose threads exchange
// nothing (one writer per output) one thread after another; warps.hpp adds the warps
// whose lanes meet at shuffles. Include it before the kernels' .cu.
#pragma once
#include <functional>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

#define __device__
#define __global__
#define __forceinline__ inline

// Runs `kernel` over `total` threads in blocks of `block`, one thread after another.
static void launch_each(long long total, unsigned block, const std::function<void()> &kernel) {
    const unsigned blocks = unsigned(total > 0 ? (total + block - 1) / block : 1);
    gridDim = {blocks, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < blocks; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            kernel();
        }
    }
}
