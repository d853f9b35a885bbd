// CPU kernels of drep::merge_weights_fwd / _bwd (docs/method.md, M1..M5).
// The merge is out x K x K: one BLAS GEMM (at::addmm) does the weight with the c3 / -c1
// scales folded into beta / alpha, and a GEMV the bias. Computed in float32 (float64 for
// float64 weights) whatever the parameter dtype, then cast.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common.h"

namespace drep {
namespace {

std::tuple<at::Tensor, at::Tensor> merge_weights_fwd_cpu(
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& denoise_weight,
    const std::optional<at::Tensor>& denoise_bias, double c1, double c3) {
  check_merge_args(weight, bias, denoise_weight, denoise_bias);
  const auto cdt = compute_dtype(weight.scalar_type());
  const at::Tensor w = weight.to(cdt);
  // M1: W' = c3 W - c1 W W_d
  at::Tensor merged_weight = at::addmm(w, w, denoise_weight.to(cdt), c3, -c1).to(weight.scalar_type());
  if (!bias.has_value() && !denoise_bias.has_value()) {
    return {merged_weight, weight.new_empty({0})};
  }
  // M2: b' = b - c1 W b_d
  // A copy even when no cast is needed: an op output must not alias its input.
  at::Tensor merged_bias = bias.has_value() ? bias->to(cdt, /*non_blocking=*/false, /*copy=*/true)
                                           : at::zeros({weight.size(0)}, w.options());
  if (denoise_bias.has_value()) {
    merged_bias = at::addmv(merged_bias, w, denoise_bias->to(cdt), 1.0, -c1);
  }
  return {merged_weight, merged_bias.to(weight.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_weights_bwd_cpu(
    const at::Tensor& grad_merged_weight, const std::optional<at::Tensor>& grad_merged_bias,
    const at::Tensor& weight, const at::Tensor& denoise_weight, const std::optional<at::Tensor>& denoise_bias,
    double c1, double c3, bool need_weight, bool need_denoise) {
  const auto cdt = compute_dtype(weight.scalar_type());
  const at::Tensor g_w = grad_merged_weight.to(cdt);
  const bool rank_one = grad_merged_bias.has_value() && denoise_bias.has_value();
  // Distinct empty tensors: outputs of a registered op must not alias each other.
  const auto opts = weight.options().dtype(cdt);
  at::Tensor grad_weight = at::empty({0}, opts), grad_dw = at::empty({0}, opts), grad_db = at::empty({0}, opts);
  if (need_weight) {
    // M3: dW = c3 G_W - c1 G_W W_d^T - c1 g_b b_d^T
    grad_weight = at::addmm(g_w, g_w, denoise_weight.to(cdt).t(), c3, -c1);
    if (rank_one) {
      grad_weight.addr_(grad_merged_bias->to(cdt), denoise_bias->to(cdt), 1.0, -c1);
    }
  }
  if (need_denoise) {
    const at::Tensor w = weight.to(cdt);
    // M4: dW_d = -c1 W^T G_W;  M5: db_d = -c1 W^T g_b
    grad_dw = at::mm(w.t(), g_w).mul_(-c1);
    if (rank_one) {
      grad_db = at::mv(w.t(), grad_merged_bias->to(cdt)).mul_(-c1);
    }
  }
  return {grad_weight, grad_dw, grad_db};
}

}  // namespace

TORCH_LIBRARY_IMPL(drep, CPU, m) {
  m.impl("merge_weights_fwd", &merge_weights_fwd_cpu);
  m.impl("merge_weights_bwd", &merge_weights_bwd_cpu);
}

}  // namespace drep
