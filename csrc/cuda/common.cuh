// Helpers shared by the CUDA kernels: the GEMM (cuBLAS, the precision policy), the launch shape
// of the elementwise kernels, the device checks, and the two macros (launch, registration)
// through which tests/cuda_host runs these sources on the CPU.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../common.h"

#ifndef DREP_CUDA_ON_HOST
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
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

// The sum of s[0 .. kN) left in s[0], in a fixed order (a halving tree: the same on every run,
// whatever the timing), for a block whose threads t < kN have each written s[t]. Every thread of
// the block calls it: it synchronizes the block before the tree and after each level.
template <int kN, typename T>
__device__ __forceinline__ void block_tree_sum(T* s, int t) {
  static_assert(kN > 0 && (kN & (kN - 1)) == 0, "the tree halves kN down to 1");
  __syncthreads();
  for (int half = kN / 2; half > 0; half /= 2) {
    if (t < half) {
      s[t] += s[t + half];
    }
    __syncthreads();
  }
}

// --- GEMMs: the precision policy (docs/method.md, "Precision") in one place -----------------
// Operands of one dtype go to cuBLAS as they are: bfloat16/float16 on tensor cores with float32
// accumulation and a float32 result (or one in the operands' dtype, alpha A B + beta C rounded
// once from float32: the merge's W', as torch.addmm makes it); float32 in full float32, or on
// TF32 tensor cores exactly when torch's own float32 matmuls use them; float64 in float64.
// gemm_compute_type decides, and gemm is its only caller: every GEMM of the loss and the merge
// follows it. The host build
// (tests/cuda_host/cublas_host.h) runs this same code against a CPU cublasGemmEx that records
// each call, so the tests see the very arguments a GPU run passes.

// The cuBLAS compute type for operands of dtype `operands`. float32: TF32 iff torch's matmul
// precision for CUDA is TF32 (torch.backends.cuda.matmul.allow_tf32 = True, fp32_precision =
// "tf32" or torch.set_float32_matmul_precision("high")), the very test torch's own cuBLAS float32
// GEMMs make; at::Context::allowTF32CuBLAS() would raise when a program mixes the old and new
// settings, and torch's GEMMs do not ask it.
inline cublasComputeType_t gemm_compute_type(at::ScalarType operands) {
  switch (operands) {
    case at::kHalf:
    case at::kBFloat16:
      return CUBLAS_COMPUTE_32F;
    case at::kFloat:
      return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
                     at::Float32Precision::TF32
                 ? CUBLAS_COMPUTE_32F_FAST_TF32
                 : CUBLAS_COMPUTE_32F;
    case at::kDouble:
      return CUBLAS_COMPUTE_64F;
    default:
      TORCH_CHECK(false, "drep: GEMM operands must be float16, bfloat16, float32 or float64, got ", operands);
  }
}

inline cudaDataType cublas_data_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    case at::kFloat:
      return CUDA_R_32F;
    case at::kDouble:
      return CUDA_R_64F;
    default:
      TORCH_CHECK(false, "drep: no cuBLAS data type for ", t);
  }
}

// A row-major GEMM operand X (rows x cols) as column-major cuBLAS reads it, to be used as X^T:
// X's own memory when one of its strides is 1 (op N over a row-major X, whose column-major
// reading is X^T; op T over a column-major X), else a contiguous copy (stepped or expanded
// views). A leading dimension is free where its dimension has one index; cuBLAS still wants it
// at least the other extent.
struct BlasOperand {
  at::Tensor data;  // what `ptr` points into (the copy, when one was needed)
  cublasOperation_t op;
  int64_t ld;
};

inline BlasOperand blas_operand(const at::Tensor& x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  if ((cols <= 1 || s1 == 1) && (rows <= 1 || s0 >= std::max<int64_t>(cols, 1))) {
    return {x, CUBLAS_OP_N, rows <= 1 ? std::max<int64_t>(cols, 1) : s0};
  }
  if ((rows <= 1 || s0 == 1) && (cols <= 1 || s1 >= std::max<int64_t>(rows, 1))) {
    return {x, CUBLAS_OP_T, cols <= 1 ? std::max<int64_t>(rows, 1) : s1};
  }
  const at::Tensor copy = x.contiguous();
  return {copy, CUBLAS_OP_N, std::max<int64_t>(cols, 1)};
}

inline int blas_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "drep: GEMM ", what, " ", v,
              " exceeds cuBLAS's 32-bit int");
  return static_cast<int>(v);
}

// While alive (and `on`): the handle's math mode plus
// CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION; the destructor restores the mode before.
class ReducedPrecisionReductionOff {
 public:
  ReducedPrecisionReductionOff(cublasHandle_t handle, bool on) : handle_(handle), on_(on) {
    if (on_) {
      TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle_, &saved_));
      TORCH_CUDABLAS_CHECK(cublasSetMathMode(
          handle_, static_cast<cublasMath_t>(saved_ | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    }
  }
  ~ReducedPrecisionReductionOff() {
    if (on_) {
      cublasSetMathMode(handle_, saved_);  // no check: a destructor must not throw
    }
  }
  ReducedPrecisionReductionOff(const ReducedPrecisionReductionOff&) = delete;
  ReducedPrecisionReductionOff& operator=(const ReducedPrecisionReductionOff&) = delete;

 private:
  cublasHandle_t handle_;
  bool on_;
  cublasMath_t saved_ = CUBLAS_DEFAULT_MATH;
};

// c = alpha a b + beta c (beta = 0: c is not read), with a (m x k) and b (k x n) of one dtype,
// in any strides, and c (m x n) row-major (unit column stride) in the result dtype of the
// policy, float32 for bfloat16/float16/float32 operands and float64 for float64, or in the
// operands' dtype (the sum formed in the compute precision, rounded once on the store).
// cuBLAS computes column-major, so this asks it for c^T = b^T a^T.
inline void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0,
                 double beta = 0.0) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.size(1) == b.size(0) && c.size(0) == a.size(0) &&
                  c.size(1) == b.size(1),
              "drep: GEMM shapes do not match: ", a.sizes(), " @ ", b.sizes(), " -> ", c.sizes());
  const auto operands = a.scalar_type();
  TORCH_CHECK(b.scalar_type() == operands, "drep: GEMM operands must have one dtype, got ", operands, " and ",
              b.scalar_type());
  const auto result = c.scalar_type();
  TORCH_CHECK(result == compute_dtype(operands) || result == operands, "drep: the GEMM result of ", operands,
              " operands is ", compute_dtype(operands), " or ", operands, ", got ", result);
  const int64_t m = c.size(0), n = c.size(1), k = a.size(1);
  TORCH_CHECK((n <= 1 || c.stride(1) == 1) && (m <= 1 || c.stride(0) >= n),
              "drep: the GEMM result must be row-major, got strides ", c.strides());
  if (m == 0 || n == 0) {
    return;
  }
  if (k == 0) {  // an empty sum: c = beta c
    if (beta == 0.0) {
      c.zero_();
    } else if (beta != 1.0) {
      c.mul_(beta);
    }
    return;
  }
  const cublasComputeType_t compute = gemm_compute_type(operands);
  const BlasOperand lhs = blas_operand(b);  // cuBLAS's A: b^T (n x k)
  const BlasOperand rhs = blas_operand(a);  // cuBLAS's B: a^T (k x m)
  const int64_t ldc = m <= 1 ? n : c.stride(0);
  // alpha and beta in the compute precision (cuBLAS's scale type), read on the host.
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  const bool f64 = compute == CUBLAS_COMPUTE_64F;
  const void* alpha_ptr = f64 ? static_cast<const void*>(&alpha) : static_cast<const void*>(&alpha_f);
  const void* beta_ptr = f64 ? static_cast<const void*>(&beta) : static_cast<const void*>(&beta_f);
  const cudaDataType type = cublas_data_type(operands);
  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  // A bf16 / fp16 result: no split-K partial sums in that dtype (cuBLAS's default math mode,
  // which torch sets on the handle it hands out, allows them), so the float32 sum is rounded
  // once. Restored on the way out, exception or not.
  const ReducedPrecisionReductionOff math_mode(handle, result != compute_dtype(operands));
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, lhs.op, rhs.op, blas_int(n, "n"),
                                    blas_int(m, "m"), blas_int(k, "k"), alpha_ptr, lhs.data.const_data_ptr(), type,
                                    blas_int(lhs.ld, "leading dimension"), rhs.data.const_data_ptr(), type,
                                    blas_int(rhs.ld, "leading dimension"), beta_ptr, c.data_ptr(),
                                    cublas_data_type(result), blas_int(ldc, "leading dimension"), compute,
                                    CUBLAS_GEMM_DEFAULT));
}

inline void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device().type() == kDeviceType, "drep: ", name, " must be a ", c10::DeviceTypeName(kDeviceType),
              " tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, "drep: ", name, " is on ", t.device(), " but expected ", device);
}

}  // namespace cuda
}  // namespace drep
