// An emulation of CUDA's warps on the CPU (over threads.hpp), for the harnesses whose
// kernels exchange values within a warp. Each launch runs 32 OS threads as the lanes of a
// warp; the lanes meet at every shuffle (which is where a warp's lanes exchange
// values), and warps and blocks run one after another, which the kernels allow: they
// share data only through shuffles and atomics. Include it before the kernels' .cu.
#pragma once
#include <barrier>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "threads.hpp"

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
