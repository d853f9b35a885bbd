// CUDA kernels of drep::merge_weights_fwd / _bwd (docs/method.md, M1..M5).
//
// cuBLAS GEMMs (common.cuh gemm: parameter-dtype operands as they are, float32 result and
// accumulation, float64 for float64; float32 on TF32 exactly when torch's matmuls are) and one
// elementwise kernel:
//   forward   W W_d (out x K) and W b_d (out x 1): two GEMMs, no [W_d | b_d] copy; then
//             W' = c3 W - c1 (W W_d), b' = b - c1 (W b_d), cast to W's dtype on the way out (M1, M2);
//   backward  G_W W_d^T (out x K) by one GEMM, then dW = c3 G_W - c1 (G_W W_d^T + g_b b_d^T)
//             elementwise, the rank-one term formed in that same pass (M3);
//             dW_d = -c1 W^T G_W and db_d = -c1 W^T g_b by two GEMMs whose alpha = -c1 is the
//             whole formula: no elementwise pass (M4, M5).
// Passes over out x K: forward the GEMM (reads W, writes W W_d in float32) and one elementwise
// pass (reads W and W W_d, writes W'); backward M3 likewise; M4, M5 read G_W and W once each in
// their GEMMs. Nothing is copied unless an operand has no unit stride (then cuBLAS gets a
// contiguous copy) or a gradient arrives in another dtype (widened, below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "common.cuh"

namespace drep {
namespace {

// out = cx x + cr (r + u v^T) elementwise over a rows x cols view (64-bit offsets, any strides);
// x == nullptr reads as 0, u == nullptr drops the rank-one term (u: rows, v: cols, contiguous).
// out may alias r (each element is read, then written, by one thread).
template <typename x_t, typename acc_t, typename out_t>
__global__ void scale_add_kernel(const x_t* x, int64_t xs0, int64_t xs1, acc_t cx, const acc_t* r, int64_t rs0,
                                 int64_t rs1, acc_t cr, const acc_t* u, const acc_t* v, out_t* out, int64_t os0,
                                 int64_t os1, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t row = i / cols;
    const int64_t col = i - row * cols;
    acc_t inner = r[row * rs0 + col * rs1];
    if (u != nullptr) {
      inner += u[row] * v[col];
    }
    acc_t value = cr * inner;
    if (x != nullptr) {
      value += cx * static_cast<acc_t>(x[row * xs0 + col * xs1]);
    }
    out[row * os0 + col * os1] = static_cast<out_t>(value);
  }
}

// Host side of scale_add_kernel. x (optional) and out are 2-D views of one shape; r is the
// float32/float64 GEMM result (the compute dtype of x); out is in x's dtype or the compute dtype;
// u, v (optional, both or neither) are vectors of r's rows and columns, cast to r's dtype here.
void scale_add(const at::Tensor& x, double cx, const at::Tensor& r, double cr, const at::Tensor& out,
               const at::Tensor& u = at::Tensor(), const at::Tensor& v = at::Tensor()) {
  TORCH_CHECK(r.dim() == 2 && out.sizes() == r.sizes() && (!x.defined() || x.sizes() == r.sizes()),
              "drep: scale_add shapes differ");
  TORCH_CHECK(u.defined() == v.defined() && (!u.defined() || (u.numel() == r.size(0) && v.numel() == r.size(1))),
              "drep: scale_add's rank-one vectors must match r's rows and columns");
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows * cols == 0) {
    return;
  }
  const auto x_dtype = x.defined() ? x.scalar_type() : out.scalar_type();
  const auto stream = at::cuda::getCurrentCUDAStream();
  // Vectors of out and K elements: their casts cost nothing next to the out x K pass.
  const at::Tensor u_acc = u.defined() ? u.to(r.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor v_acc = v.defined() ? v.to(r.scalar_type()).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "drep_scale_add", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(r.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "drep: scale_add: GEMM result dtype ",
                r.scalar_type(), " is not the compute dtype of ", x_dtype);
    const scalar_t* x_ptr = x.defined() ? x.const_data_ptr<scalar_t>() : nullptr;
    const int64_t xs0 = x.defined() ? x.stride(0) : 0, xs1 = x.defined() ? x.stride(1) : 0;
    const acc_t* u_ptr = u_acc.defined() ? u_acc.const_data_ptr<acc_t>() : nullptr;
    const acc_t* v_ptr = v_acc.defined() ? v_acc.const_data_ptr<acc_t>() : nullptr;
    const unsigned int blocks = cuda::blocks_for(rows * cols);
    if (out.scalar_type() == x_dtype) {
      DREP_LAUNCH(blocks, cuda::kThreads, 0, stream, scale_add_kernel<scalar_t, acc_t, scalar_t>)(
          x_ptr, xs0, xs1, static_cast<acc_t>(cx), r.const_data_ptr<acc_t>(), r.stride(0), r.stride(1),
          static_cast<acc_t>(cr), u_ptr, v_ptr, out.mutable_data_ptr<scalar_t>(), out.stride(0), out.stride(1), rows,
          cols);
    } else {
      TORCH_CHECK(out.scalar_type() == r.scalar_type(), "drep: scale_add: output dtype ", out.scalar_type(),
                  " is neither ", x_dtype, " nor ", r.scalar_type());
      DREP_LAUNCH(blocks, cuda::kThreads, 0, stream, scale_add_kernel<scalar_t, acc_t, acc_t>)(
          x_ptr, xs0, xs1, static_cast<acc_t>(cx), r.const_data_ptr<acc_t>(), r.stride(0), r.stride(1),
          static_cast<acc_t>(cr), u_ptr, v_ptr, out.mutable_data_ptr<acc_t>(), out.stride(0), out.stride(1), rows,
          cols);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_devices(const at::Device& device, std::initializer_list<std::pair<const char*, const at::Tensor*>> named) {
  for (const auto& [name, t] : named) {
    if (t != nullptr && t->defined()) {
      cuda::check_cuda(*t, name, device);
    }
  }
}

void check_same_dtype(const at::Tensor& weight, const std::optional<at::Tensor>& t, const char* name) {
  TORCH_CHECK(!t.has_value() || t->scalar_type() == weight.scalar_type(), "drep: ", name, " dtype ",
              t->scalar_type(), " differs from weight dtype ", weight.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> merge_weights_fwd_cuda(
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& denoise_weight,
    const std::optional<at::Tensor>& denoise_bias, double c1, double c3) {
  check_merge_args(weight, bias, denoise_weight, denoise_bias);
  check_same_dtype(weight, bias, "bias");
  check_same_dtype(weight, denoise_bias, "denoise_bias");
  const auto device = weight.device();
  check_devices(device, {{"weight", &weight},
                         {"bias", bias ? &*bias : nullptr},
                         {"denoise_weight", &denoise_weight},
                         {"denoise_bias", denoise_bias ? &*denoise_bias : nullptr}});
  const c10::cuda::CUDAGuard guard(device);
  const auto opts = weight.options().dtype(compute_dtype(weight.scalar_type()));
  const int64_t out = weight.size(0), k = weight.size(1);

  // M1: W' = c3 W - c1 W W_d, contiguous on every backend (as the fake kernels promise).
  at::Tensor prod = at::empty({out, k}, opts);
  cuda::gemm(prod, weight, denoise_weight);
  at::Tensor merged_weight = at::empty({out, k}, weight.options());
  scale_add(weight, c3, prod, -c1, merged_weight);
  if (!bias.has_value() && !denoise_bias.has_value()) {
    return {merged_weight, weight.new_empty({0})};
  }
  at::Tensor merged_bias = at::empty({out}, weight.options());
  if (denoise_bias.has_value()) {
    // M2: b' = b - c1 W b_d (b = 0 when the layer has none); W b_d as an out x K x 1 GEMM.
    at::Tensor prod_b = at::empty({out, 1}, opts);
    cuda::gemm(prod_b, weight, denoise_bias->unsqueeze(1));
    scale_add(bias.has_value() ? bias->unsqueeze(1) : at::Tensor(), 1.0, prod_b, -c1, merged_bias.unsqueeze(1));
  } else {
    merged_bias.copy_(*bias);  // no b_d: b' = b
  }
  return {merged_weight, merged_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_weights_bwd_cuda(
    const at::Tensor& grad_merged_weight, const std::optional<at::Tensor>& grad_merged_bias, const at::Tensor& weight,
    const at::Tensor& denoise_weight, const std::optional<at::Tensor>& denoise_bias, double c1, double c3,
    bool need_weight, bool need_denoise) {
  check_merge_args(weight, std::nullopt, denoise_weight, denoise_bias);
  check_same_dtype(weight, denoise_bias, "denoise_bias");
  const int64_t out = weight.size(0), k = weight.size(1);
  TORCH_CHECK(grad_merged_weight.sizes() == weight.sizes(), "drep: grad_merged_weight must be ", weight.sizes(),
              ", got ", grad_merged_weight.sizes());
  TORCH_CHECK(!grad_merged_bias.has_value() || grad_merged_bias->sizes() == at::IntArrayRef({out}),
              "drep: grad_merged_bias must be (", out, ",)");
  const auto device = weight.device();
  check_devices(device, {{"grad_merged_weight", &grad_merged_weight},
                         {"grad_merged_bias", grad_merged_bias ? &*grad_merged_bias : nullptr},
                         {"weight", &weight},
                         {"denoise_weight", &denoise_weight},
                         {"denoise_bias", denoise_bias ? &*denoise_bias : nullptr}});
  const c10::cuda::CUDAGuard guard(device);
  const auto cdt = compute_dtype(weight.scalar_type());
  const auto opts = weight.options().dtype(cdt);
  const bool rank_one = grad_merged_bias.has_value() && denoise_bias.has_value();
  // Gradients arrive in the weight's dtype; any other dtype is widened to the compute dtype, and
  // a GEMM that pairs such a gradient with a parameter widens the parameter too (one operand
  // dtype per GEMM: the policy of common.cuh).
  const auto widen = [&](const at::Tensor& t) { return t.scalar_type() == weight.scalar_type() ? t : t.to(cdt); };
  const auto like = [&](const at::Tensor& param, const at::Tensor& grad) {
    return param.scalar_type() == grad.scalar_type() ? param : param.to(grad.scalar_type());
  };
  const at::Tensor g_w = widen(grad_merged_weight);

  // Absent outputs are 0-element tensors, one per output (outputs must not alias each other).
  at::Tensor grad_weight = at::empty({0}, opts), grad_dw = at::empty({0}, opts), grad_db = at::empty({0}, opts);
  if (need_weight) {
    // M3: dW = c3 G_W - c1 (G_W W_d^T + g_b b_d^T).
    grad_weight = at::empty({out, k}, opts);
    cuda::gemm(grad_weight, g_w, like(denoise_weight, g_w).t());
    // In place: each element read, then written.
    scale_add(g_w, c3, grad_weight, -c1, grad_weight, rank_one ? *grad_merged_bias : at::Tensor(),
              rank_one ? *denoise_bias : at::Tensor());
  }
  if (need_denoise) {
    // M4: dW_d = -c1 W^T G_W.
    grad_dw = at::empty({k, k}, opts);
    cuda::gemm(grad_dw, like(weight, g_w).t(), g_w, -c1);
    if (rank_one) {
      // M5: db_d = -c1 W^T g_b, a K x out x 1 GEMM.
      const at::Tensor g_b = widen(*grad_merged_bias);
      grad_db = at::empty({k}, opts);
      cuda::gemm(grad_db.unsqueeze(1), like(weight, g_b).t(), g_b.unsqueeze(1), -c1);
    }
  }
  return {grad_weight, grad_dw, grad_db};
}

}  // namespace

DREP_CUDA_KERNELS(m) {
  m.impl("merge_weights_fwd", &merge_weights_fwd_cuda);
  m.impl("merge_weights_bwd", &merge_weights_bwd_cuda);
}

}  // namespace drep
