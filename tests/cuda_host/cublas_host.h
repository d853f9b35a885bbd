// The part of cuBLAS that csrc/cuda/common.cuh calls (cublasGemmEx on torch's handle), on the CPU:
// same names, same column-major semantics, same argument checks for what the kernels pass, so
// that common.cuh's gemm runs unchanged in the host build, its layout logic (transposes, leading
// dimensions, beta) included. Each call is also recorded (GemmCall): the tests read the operand,
// result and compute types the policy chose (drep_cuda_host::_gemm_calls, gemm_log.cpp).
//
// The product is computed with ATen's CPU GEMM in the compute precision: operands widened
// exactly to float32 (float64 for CUBLAS_COMPUTE_64F); CUBLAS_COMPUTE_32F_FAST_TF32 first rounds
// them to TF32 (10 mantissa bits, to nearest, ties away from zero, as cvt.rna.tf32.f32 does);
// then alpha times the product, plus beta times C unless beta is 0 (C is then not read, as in
// cuBLAS: it may hold anything). The order of the sums is ATen's, not cuBLAS's.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

struct cublasContext;
using cublasHandle_t = cublasContext*;

enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_NOT_SUPPORTED = 15 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
using cudaDataType = cudaDataType_t;
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77, CUBLAS_COMPUTE_64F = 70 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16 };

#define TORCH_CUDABLAS_CHECK(EXPR)                                                                   \
  do {                                                                                               \
    const cublasStatus_t drep_status = (EXPR);                                                       \
    TORCH_CHECK(drep_status == CUBLAS_STATUS_SUCCESS, "cuBLAS (host build) status ", drep_status, \
                " when calling `" #EXPR "`");                                                        \
  } while (0)

namespace at::cuda {
inline cublasHandle_t getCurrentCUDABlasHandle() { return nullptr; }
}  // namespace at::cuda

namespace drep_cuda_host {

struct GemmCall {
  cublasOperation_t transa, transb;
  int m, n, k, lda, ldb, ldc;
  cudaDataType a_type, b_type, c_type;
  cublasComputeType_t compute;
  double alpha, beta;
  bool reduced_precision_reduction;  // the handle's math mode allowed it during the call
};

inline std::mutex gemm_log_mutex;
inline std::vector<GemmCall> gemm_log;
// The handle's math mode (one handle, as torch's per thread and device; the kernels run on the
// calling thread).
inline thread_local cublasMath_t math_mode = CUBLAS_DEFAULT_MATH;

inline const char* name_of(cudaDataType t) {
  switch (t) {
    case CUDA_R_16F:
      return "CUDA_R_16F";
    case CUDA_R_16BF:
      return "CUDA_R_16BF";
    case CUDA_R_32F:
      return "CUDA_R_32F";
    case CUDA_R_64F:
      return "CUDA_R_64F";
  }
  return "?";
}

inline const char* name_of(cublasComputeType_t t) {
  switch (t) {
    case CUBLAS_COMPUTE_32F:
      return "CUBLAS_COMPUTE_32F";
    case CUBLAS_COMPUTE_32F_FAST_TF32:
      return "CUBLAS_COMPUTE_32F_FAST_TF32";
    case CUBLAS_COMPUTE_64F:
      return "CUBLAS_COMPUTE_64F";
  }
  return "?";
}

// The calls since the last take, as "key=value ..." lines, and the log emptied.
inline std::vector<std::string> take_gemm_calls() {
  const std::lock_guard<std::mutex> lock(gemm_log_mutex);
  std::vector<std::string> lines;
  for (const GemmCall& c : gemm_log) {
    std::ostringstream line;
    line.precision(17);  // alpha and beta exactly (a double round-trips in 17 digits)
    line << "transa=" << (c.transa == CUBLAS_OP_N ? 'N' : 'T') << " transb=" << (c.transb == CUBLAS_OP_N ? 'N' : 'T')
         << " m=" << c.m << " n=" << c.n << " k=" << c.k << " lda=" << c.lda << " ldb=" << c.ldb << " ldc=" << c.ldc
         << " A=" << name_of(c.a_type) << " B=" << name_of(c.b_type) << " C=" << name_of(c.c_type)
         << " compute=" << name_of(c.compute) << " alpha=" << c.alpha << " beta=" << c.beta
         << " reduced_precision_reduction=" << (c.reduced_precision_reduction ? "allowed" : "off");
    lines.push_back(line.str());
  }
  gemm_log.clear();
  return lines;
}

inline at::ScalarType scalar_type_of(cudaDataType t) {
  switch (t) {
    case CUDA_R_16F:
      return at::kHalf;
    case CUDA_R_16BF:
      return at::kBFloat16;
    case CUDA_R_32F:
      return at::kFloat;
    case CUDA_R_64F:
      return at::kDouble;
  }
  return at::kFloat;
}

// The (A type, C type, compute type) combinations of cublasGemmEx's table that the policy uses.
inline bool supported(cudaDataType ab, cudaDataType c, cublasComputeType_t compute) {
  switch (compute) {
    case CUBLAS_COMPUTE_32F:  // half operands: a float32 result or one in their own dtype
      return (c == CUDA_R_32F && (ab == CUDA_R_16F || ab == CUDA_R_16BF || ab == CUDA_R_32F)) ||
             (c == ab && (ab == CUDA_R_16F || ab == CUDA_R_16BF));
    case CUBLAS_COMPUTE_32F_FAST_TF32:
      return c == CUDA_R_32F && ab == CUDA_R_32F;
    case CUBLAS_COMPUTE_64F:
      return c == CUDA_R_64F && ab == CUDA_R_64F;
  }
  return false;
}

// float32 values rounded to TF32: 10 of the 23 mantissa bits kept, to nearest, ties away from
// zero (adding half of the last kept bit to the magnitude, then truncating). inf and NaN stay.
inline at::Tensor round_to_tf32(const at::Tensor& t) {
  at::Tensor r = t.contiguous().clone();
  float* v = r.data_ptr<float>();
  for (int64_t i = 0; i < r.numel(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &v[i], sizeof bits);
    if ((bits & 0x7F800000u) != 0x7F800000u) {
      bits = (bits + 0x1000u) & 0xFFFFE000u;
      std::memcpy(&v[i], &bits, sizeof bits);
    }
  }
  return r;
}

// A column-major rows x cols matrix at ptr with leading dimension ld, as a tensor view.
inline at::Tensor column_major(const void* ptr, cudaDataType type, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<void*>(ptr), {rows, cols}, {1, ld}, at::dtype(scalar_type_of(type)));
}

}  // namespace drep_cuda_host

inline cublasStatus_t cublasGetMathMode(cublasHandle_t, cublasMath_t* mode) {
  *mode = drep_cuda_host::math_mode;
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t mode) {
  drep_cuda_host::math_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

// C = alpha op(A) op(B) + beta C, column-major: op(A) m x k, op(B) k x n, C m x n.
inline cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                   int k, const void* alpha, const void* A, cudaDataType Atype, int lda,
                                   const void* B, cudaDataType Btype, int ldb, const void* beta, void* C,
                                   cudaDataType Ctype, int ldc, cublasComputeType_t computeType, cublasGemmAlgo_t) {
  using namespace drep_cuda_host;
  const int a_rows = transa == CUBLAS_OP_N ? m : k, a_cols = transa == CUBLAS_OP_N ? k : m;
  const int b_rows = transb == CUBLAS_OP_N ? k : n, b_cols = transb == CUBLAS_OP_N ? n : k;
  if (m < 0 || n < 0 || k < 0 || lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (Atype != Btype || !supported(Atype, Ctype, computeType)) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const bool f64 = computeType == CUBLAS_COMPUTE_64F;
  const double alpha_v = f64 ? *static_cast<const double*>(alpha) : *static_cast<const float*>(alpha);
  const double beta_v = f64 ? *static_cast<const double*>(beta) : *static_cast<const float*>(beta);
  {
    const std::lock_guard<std::mutex> lock(gemm_log_mutex);
    const bool reduced = (math_mode & CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION) == 0;
    gemm_log.push_back(
        {transa, transb, m, n, k, lda, ldb, ldc, Atype, Btype, Ctype, computeType, alpha_v, beta_v, reduced});
  }
  if (m == 0 || n == 0) {
    return CUBLAS_STATUS_SUCCESS;
  }
  const auto cdt = f64 ? at::kDouble : at::kFloat;
  at::Tensor a = column_major(A, Atype, a_rows, a_cols, lda).to(cdt);
  at::Tensor b = column_major(B, Btype, b_rows, b_cols, ldb).to(cdt);
  if (computeType == CUBLAS_COMPUTE_32F_FAST_TF32) {
    a = round_to_tf32(a);
    b = round_to_tf32(b);
  }
  a = transa == CUBLAS_OP_N ? a : a.t();
  b = transb == CUBLAS_OP_N ? b : b.t();
  at::Tensor c = column_major(C, Ctype, m, n, ldc);
  at::Tensor result = at::mm(a, b).mul_(alpha_v);
  if (beta_v != 0.0) {
    result.add_(c.to(cdt), beta_v);
  }
  c.copy_(result);
  return CUBLAS_STATUS_SUCCESS;
}
