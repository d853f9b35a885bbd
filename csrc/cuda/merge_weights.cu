// CUDA kernels of drep::merge_weights_fwd / _bwd (docs/method.md, M1..M5).
//
// cuBLAS GEMMs (common.cuh gemm: parameter-dtype operands as they are, float32 accumulation,
// float64 for float64; float32 on TF32 exactly when torch's matmuls are) and a kernel per pass:
//   forward   two launches, as torch.addmm(W, W, W_d, beta=c3, alpha=-c1) takes: merge_prep_kernel
//             copies W into the result W' and forms b' = b - c1 (W b_d) in the same pass over W
//             (M2; W b_d as dot products in float32 / float64 on the CUDA cores, never TF32:
//             K multiply-adds per row, the torch backend's addmv); then one GEMM
//             W' = c3 W' - c1 W W_d, beta = c3 on the copy, the sum formed in float32 and
//             rounded once to W's dtype (M1). No [W_d | b_d] copy, no float32 product in memory;
//   backward  G_W W_d^T (out x K) by one GEMM, then dW = c3 G_W - c1 (G_W W_d^T + g_b b_d^T)
//             elementwise, the rank-one term formed in that same pass (M3);
//             dW_d = -c1 W^T G_W and db_d = -c1 W^T g_b by two GEMMs whose alpha = -c1 is the
//             whole formula: no elementwise pass (M4, M5).
// Passes over out x K: forward the copy (reads W, writes W') and the GEMM (reads W and W',
// writes W'), torch.addmm's own passes; backward M3: the GEMM (reads G_W, writes G_W W_d^T in
// float32) and one elementwise pass; M4, M5 read G_W and W once each in
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

constexpr int kPrepThreads = 256;

// M1's copy and M2 in one pass over W, a block per row: the row of W (any strides) is copied
// into the contiguous W' (which the GEMM then scales by c3), and with merged_b != nullptr
// b' = b - c1 (W b_d) for the row, its dot product summed in acc_t in a fixed order (each
// thread strided over the row, then a tree over the block). b and b_d may be nullptr (0).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPrepThreads)
    merge_prep_kernel(const scalar_t* w, int64_t ws0, int64_t ws1, const scalar_t* b, int64_t bs,
                      const scalar_t* bd, int64_t bds, acc_t c1, int64_t k, scalar_t* merged_w, scalar_t* merged_b) {
  const int64_t row = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  acc_t dot = 0;
  for (int64_t col = t; col < k; col += kPrepThreads) {
    const scalar_t v = w[row * ws0 + col * ws1];
    merged_w[row * k + col] = v;
    if (bd != nullptr) {
      dot += static_cast<acc_t>(v) * static_cast<acc_t>(bd[col * bds]);
    }
  }
  if (merged_b == nullptr) {  // uniform per launch: the __syncthreads below are reached by all or none
    return;
  }
  __shared__ acc_t s[kPrepThreads];
  s[t] = dot;
  cuda::block_tree_sum<kPrepThreads>(s, t);
  if (t == 0) {
    const acc_t bias = b != nullptr ? static_cast<acc_t>(b[row * bs]) : acc_t(0);
    merged_b[row] = static_cast<scalar_t>(bias - c1 * s[0]);
  }
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
  const int64_t out = weight.size(0), k = weight.size(1);
  // W' contiguous on every backend (as the fake kernels promise); b' (out,) when the layer or
  // its denoiser has a bias, else a 0-element tensor.
  at::Tensor merged_weight = at::empty({out, k}, weight.options());
  const bool has_bias = bias.has_value() || denoise_bias.has_value();
  at::Tensor merged_bias = weight.new_empty({has_bias ? out : 0});
  if (out == 0) {
    return {merged_weight, merged_bias};
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "drep_merge_prep", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DREP_LAUNCH(static_cast<unsigned int>(out), kPrepThreads, 0, stream, merge_prep_kernel<scalar_t, acc_t>)(
        weight.const_data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
        bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, bias.has_value() ? bias->stride(0) : 0,
        denoise_bias.has_value() ? denoise_bias->const_data_ptr<scalar_t>() : nullptr,
        denoise_bias.has_value() ? denoise_bias->stride(0) : 0, static_cast<acc_t>(c1), k,
        merged_weight.mutable_data_ptr<scalar_t>(), has_bias ? merged_bias.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // M1: W' = c3 W' - c1 W W_d on the copy, rounded once to W's dtype.
  cuda::gemm(merged_weight, weight, denoise_weight, -c1, c3);
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
