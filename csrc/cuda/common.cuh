// Helpers shared by the CUDA kernels: GEMMs with a float32 (float64) result whatever the
// operand dtype, the launch shape of the elementwise kernels, and the device checks.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>

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
#if DREP_HALF_GEMM_FP32_OUT
  if (acc == at::kFloat && a.scalar_type() == b.scalar_type() && is_half(a.scalar_type())) {
    at::mm_out(out, a, b, acc);
    return;
  }
#endif
  at::mm_out(out, a.to(acc), b.to(acc));
}

inline void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "drep: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, "drep: ", name, " is on ", t.device(), " but expected ", device);
}

}  // namespace cuda
}  // namespace drep
