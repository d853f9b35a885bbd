// Helpers shared by the CUDA kernels: GEMMs with a float32 (float64) result whatever the
// operand dtype, the launch shape of the elementwise kernels, the device checks, and the two
// macros (launch, registration) through which tests/cuda_host runs these sources on the CPU.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>

#ifndef DREP_CUDA_ON_HOST
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

// kernel<<<grid, block, smem, stream>>>(args...) is written
// DREP_LAUNCH(grid, block, smem, stream, kernel)(args...): a host compiler cannot parse <<< >>>,
// and the host build of these sources (tests/cuda_host/cuda_host.h, which defines
// DREP_CUDA_ON_HOST and its own DREP_LAUNCH) runs the same kernels on host threads.
#define DREP_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
// The kernels are drep's CUDA kernels; the host build registers them for CPU tensors under a
// test namespace instead (drep's CPU kernels are csrc/cpu's).
#define DREP_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(drep, CUDA, m)
#endif

// aten::mm.dtype (float16/bfloat16 operands, float32 result, float32 accumulation in cuBLAS)
// exists from torch 2.8. Without it (or built with -DDREP_UPCAST_GEMM, to test that path) the
// half-precision operands are upcast to float32 copies first: the same result up to the
// accumulation order, one extra pass over each operand, and no tensor cores unless TF32 is on.
#if !defined(DREP_UPCAST_GEMM) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8))
#define DREP_HALF_GEMM_FP32_OUT 1
#else
#define DREP_HALF_GEMM_FP32_OUT 0
#endif

namespace drep {
namespace cuda {

constexpr int kThreads = 256;

#ifdef DREP_CUDA_ON_HOST
constexpr at::DeviceType kDeviceType = at::kCPU;  // the host build runs on CPU tensors
#else
constexpr at::DeviceType kDeviceType = at::kCUDA;
#endif

// Blocks for a grid-stride loop over n elements (n > 0): enough to fill any current GPU,
// few enough that gridDim.x never nears its limit.
inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 16));
}

inline bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// out (m x n, float32 or float64) = a (m x k) @ b (k x n). Half-precision operands of one dtype
// go to cuBLAS as they are (tensor cores, float32 accumulate and result); anything else is
// first cast to out's dtype. `out` may be a view (e.g. the first rows of a chunk buffer).
// TF32 follows torch.backends.cuda.matmul (off by default), as for any torch matmul.
inline void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto acc = out.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "drep: GEMM result must be float32 or float64");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) && out.size(0) == a.size(0) &&
                  out.size(1) == b.size(1),
              "drep: GEMM shapes do not match: ", a.sizes(), " @ ", b.sizes(), " -> ", out.sizes());
  if (out.numel() == 0) {
    return;
  }
  if (a.size(1) == 0) {  // an empty sum
    out.zero_();
    return;
  }
  if (a.scalar_type() == acc && b.scalar_type() == acc) {
    at::mm_out(out, a, b);
    return;
  }
  // aten::mm.dtype has no CPU kernel: the host build (tests/cuda_host) takes the upcast below,
  // which gives the same products (exact in float32) and float32 sums.
#if DREP_HALF_GEMM_FP32_OUT && !defined(DREP_CUDA_ON_HOST)
  if (acc == at::kFloat && a.scalar_type() == b.scalar_type() && is_half(a.scalar_type())) {
    at::mm_out(out, a, b, acc);
    return;
  }
#endif
  at::mm_out(out, a.to(acc), b.to(acc));
}

inline void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device().type() == kDeviceType, "drep: ", name, " must be a ", c10::DeviceTypeName(kDeviceType),
              " tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, "drep: ", name, " is on ", t.device(), " but expected ", device);
}

}  // namespace cuda
}  // namespace drep
