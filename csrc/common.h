// Helpers shared by the CPU and CUDA kernels: argument checks and the compute dtype.
#pragma once
#include <ATen/ATen.h>

namespace drep {

// Half-precision inputs are computed (accumulated) in float32, float64 stays float64.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_merge_args(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& denoise_weight, const std::optional<at::Tensor>& denoise_bias) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D (out, K), got ", weight.sizes());
  const int64_t out = weight.size(0), k = weight.size(1);
  TORCH_CHECK(denoise_weight.sizes() == at::IntArrayRef({k, k}), "denoise_weight must be (", k, ", ", k,
              "), got ", denoise_weight.sizes());
  TORCH_CHECK(!bias.has_value() || bias->sizes() == at::IntArrayRef({out}), "bias must be (", out, ",)");
  TORCH_CHECK(!denoise_bias.has_value() || denoise_bias->sizes() == at::IntArrayRef({k}),
              "denoise_bias must be (", k, ",)");
  TORCH_CHECK(denoise_weight.scalar_type() == weight.scalar_type(), "denoise_weight dtype ",
              denoise_weight.scalar_type(), " differs from weight dtype ", weight.scalar_type());
}

}  // namespace drep
