// The CUDA language and runtime as far as csrc/cuda/*.cu use them, in host C++: the .cpp files
// next to this header include it, then a .cu file as it is, so that tests/test_cuda_on_host.py
// runs the CUDA kernels' own code on the CPU and every change to a .cu file is tested without a
// GPU.
//
// A launch runs one host thread per CUDA thread of a block and the blocks one after another, in
// grid order (x fastest); __syncthreads is a barrier of the block's threads; __shared__ variables
// are static (one block at a time uses them). A block's threads really run concurrently, so a
// missing __syncthreads shows as a wrong (or varying) result; blocks never overlap, so races
// between blocks do not show. The kernels register for CPU tensors under the test namespace
// drep_cuda_host (the test defines its schemas from drep's). csrc/cuda/common.cuh's GEMM calls
// cublasGemmEx as on a GPU; cublas_host.h computes it with ATen's CPU GEMM and records the call.
// Not emulated: warps (these kernels have no warp shuffles or warp-synchronous code), dynamic
// shared memory, streams (a launch returns when its grid is done), and the __CUDA_ARCH__ branches
// of csrc/philox.h (their host twins run: a 64-bit product for __umulhi, std::log, std::sin and
// std::cos for logf and sincospif).
#pragma once
#define DREP_CUDA_ON_HOST 1

// Every header the .cu files include, before the keyword macros below can reach them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cublas_host.h"

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace drep_cuda_host {

// The built-in variables of the CUDA thread a host thread plays, and its block's barrier.
inline thread_local uint3 thread_idx{};
inline thread_local uint3 block_idx{};
inline thread_local dim3 block_dim;
inline thread_local dim3 grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;

// kernel<<<grid, block, smem>>> as an object called with the kernel's arguments. A configuration
// that CUDA would refuse (compute capability 8.0 and later) raises instead of running.
template <typename... Params>
class Launch {
 public:
  Launch(dim3 grid, dim3 block, std::size_t smem, void (*kernel)(Params...))
      : grid_(grid), block_(block), kernel_(kernel) {
    TORCH_CHECK(smem == 0, "cuda_host: dynamic shared memory is not emulated");
    TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && block.x >= 1 && block.y >= 1 && block.z >= 1,
                "cuda_host: invalid configuration: a grid or block dimension is 0");
    TORCH_CHECK(grid.x <= static_cast<unsigned int>(std::numeric_limits<int>::max()) && grid.y <= 65535 &&
                    grid.z <= 65535,
                "cuda_host: invalid configuration: grid (", grid.x, ", ", grid.y, ", ", grid.z,
                ") exceeds (2^31 - 1, 65535, 65535)");
    TORCH_CHECK(block.x <= 1024 && block.y <= 1024 && block.z <= 64 &&
                    static_cast<uint64_t>(block.x) * block.y * block.z <= 1024,
                "cuda_host: invalid configuration: block (", block.x, ", ", block.y, ", ", block.z,
                ") exceeds 1024 threads or (1024, 1024, 64)");
  }

  template <typename... Args>
  void operator()(Args&&... args) const {
    // Converted to the parameter types once; every call below copies them, as every CUDA
    // thread gets its own copy of the arguments.
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    const unsigned int threads = block_.x * block_.y * block_.z;
    std::barrier<> barrier(threads);
    std::vector<std::thread> team;
    team.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t) {
      team.emplace_back([&, t] {
        thread_idx = {t % block_.x, t / block_.x % block_.y, t / (block_.x * block_.y)};
        block_dim = block_;
        grid_dim = grid_;
        block_barrier = &barrier;
        for (unsigned int z = 0; z < grid_.z; ++z) {
          for (unsigned int y = 0; y < grid_.y; ++y) {
            for (unsigned int x = 0; x < grid_.x; ++x) {
              block_idx = {x, y, z};
              std::apply(kernel_, params);
              barrier.arrive_and_wait();  // the block is done: the next one may reuse its shared memory
            }
          }
        }
      });
    }
    for (std::thread& member : team) {
      member.join();
    }
  }

 private:
  dim3 grid_, block_;
  void (*kernel_)(Params...);
};

}  // namespace drep_cuda_host

inline void __syncthreads() { drep_cuda_host::block_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (::drep_cuda_host::thread_idx)
#define blockIdx (::drep_cuda_host::block_idx)
#define blockDim (::drep_cuda_host::block_dim)
#define gridDim (::drep_cuda_host::grid_dim)

// csrc/cuda/common.cuh's launch and registration macros, on the host.
#define DREP_LAUNCH(grid, block, smem, stream, ...) \
  (static_cast<void>(stream), ::drep_cuda_host::Launch(grid, block, smem, __VA_ARGS__))
#define DREP_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(drep_cuda_host, CPU, m)
// A bad configuration raised in Launch; nothing is left to check after a synchronous launch.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() static_cast<void>(0)

namespace at::cuda {
// One stream: a host launch is synchronous.
struct HostStream {};
inline HostStream getCurrentCUDAStream() { return {}; }
}  // namespace at::cuda

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "cuda_host: the host build runs on CPU tensors, got ", device);
  }
};
}  // namespace c10::cuda
