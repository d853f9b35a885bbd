// CUDA kernels of drep::merge_weights_fwd / _bwd (docs/method.md, M1..M5).
//
// Each direction is one cuBLAS GEMM (through ATen) plus one elementwise kernel:
//   forward   W [W_d | b_d] = [W W_d | W b_d]            (out x (K+1)): M1 and M2 in one GEMM,
//             then W' = c3 W - c1 (W W_d), b' = b - c1 (W b_d), cast to W's dtype on the way out;
//   backward  [G_W | g_b] [W_d | b_d]^T                   (out x K): M3's two products in one GEMM,
//             W^T [G_W | g_b] = [W^T G_W | W^T g_b]       (K x (K+1)): M4 and M5 in one GEMM.
// The bias rides as an extra column ("[A | v]"), so a bias costs no second pass over W.
//
// Why ATen's GEMM and not our own cublasGemmEx / cublasLt call: this file was written without
// a GPU to run it on, and aten::mm already is the cuBLAS call we would write (bf16/fp16
// operands as they are, float32 compute and result via aten::mm.dtype, torch >= 2.8), with
// its stream, workspace, math-mode flags and operand layouts handled and tested upstream. The
// merge is out x K x K once per parameter change; the only extra traffic is the [W_d | b_d]
// copy (K x K) and the float32 product (out x K), both small next to the GEMM. Computed in
// float32 (float64 for float64 weights) whatever the parameter dtype, as the reference does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "common.cuh"

namespace drep {
namespace {

// out = cx * x + cr * r elementwise over a rows x cols view (64-bit offsets, any strides);
// x == nullptr reads as 0. out may alias r (each element is read, then written, by one thread).
template <typename x_t, typename acc_t, typename out_t>
__global__ void scale_add_kernel(const x_t* x, int64_t xs0, int64_t xs1, acc_t cx, const acc_t* r, int64_t rs0,
                                 int64_t rs1, acc_t cr, out_t* out, int64_t os0, int64_t os1, int64_t rows,
                                 int64_t cols) {
  const int64_t n = rows * cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t row = i / cols;
    const int64_t col = i - row * cols;
    acc_t v = cr * r[row * rs0 + col * rs1];
    if (x != nullptr) {
      v += cx * static_cast<acc_t>(x[row * xs0 + col * xs1]);
    }
    out[row * os0 + col * os1] = static_cast<out_t>(v);
  }
}

// Host side of scale_add_kernel. x (optional) and out are 2-D views of one shape; r is the
// float32/float64 GEMM result (the compute dtype of x); out is in x's dtype or the compute dtype.
void scale_add(const at::Tensor& x, double cx, const at::Tensor& r, double cr, const at::Tensor& out) {
  TORCH_CHECK(r.dim() == 2 && out.sizes() == r.sizes() && (!x.defined() || x.sizes() == r.sizes()),
              "drep: scale_add shapes differ");
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows * cols == 0) {
    return;
  }
  const auto x_dtype = x.defined() ? x.scalar_type() : out.scalar_type();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "drep_scale_add", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(r.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "drep: scale_add: GEMM result dtype ",
                r.scalar_type(), " is not the compute dtype of ", x_dtype);
    const scalar_t* x_ptr = x.defined() ? x.const_data_ptr<scalar_t>() : nullptr;
    const int64_t xs0 = x.defined() ? x.stride(0) : 0, xs1 = x.defined() ? x.stride(1) : 0;
    const unsigned int blocks = cuda::blocks_for(rows * cols);
    if (out.scalar_type() == x_dtype) {
      DREP_LAUNCH(blocks, cuda::kThreads, 0, stream, scale_add_kernel<scalar_t, acc_t, scalar_t>)(
          x_ptr, xs0, xs1, static_cast<acc_t>(cx), r.const_data_ptr<acc_t>(), r.stride(0), r.stride(1),
          static_cast<acc_t>(cr), out.mutable_data_ptr<scalar_t>(), out.stride(0), out.stride(1), rows, cols);
    } else {
      TORCH_CHECK(out.scalar_type() == r.scalar_type(), "drep: scale_add: output dtype ", out.scalar_type(),
                  " is neither ", x_dtype, " nor ", r.scalar_type());
      DREP_LAUNCH(blocks, cuda::kThreads, 0, stream, scale_add_kernel<scalar_t, acc_t, acc_t>)(
          x_ptr, xs0, xs1, static_cast<acc_t>(cx), r.const_data_ptr<acc_t>(), r.stride(0), r.stride(1),
          static_cast<acc_t>(cr), out.mutable_data_ptr<acc_t>(), out.stride(0), out.stride(1), rows, cols);
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

// [A | v]: the vector v as one more column of the matrix A (exact: no dtype change).
at::Tensor with_column(const at::Tensor& a, const at::Tensor& v) { return at::cat({a, v.unsqueeze(1)}, 1); }

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
  const auto cdt = compute_dtype(weight.scalar_type());
  const int64_t out = weight.size(0), k = weight.size(1);
  const bool has_bd = denoise_bias.has_value();

  // M1, M2: prod = W [W_d | b_d] in the compute dtype.
  const at::Tensor rhs = has_bd ? with_column(denoise_weight, *denoise_bias) : denoise_weight;
  at::Tensor prod = at::empty({out, k + (has_bd ? 1 : 0)}, weight.options().dtype(cdt));
  cuda::mm_acc_out(prod, weight, rhs);

  // M1: W' = c3 W - c1 W W_d, contiguous on every backend (as the fake kernels promise).
  at::Tensor merged_weight = at::empty({out, k}, weight.options());
  scale_add(weight, c3, prod.narrow(1, 0, k), -c1, merged_weight);
  if (!bias.has_value() && !has_bd) {
    return {merged_weight, weight.new_empty({0})};
  }
  at::Tensor merged_bias = at::empty({out}, weight.options());
  if (has_bd) {
    // M2: b' = b - c1 W b_d (b = 0 when the layer has none).
    scale_add(bias.has_value() ? bias->unsqueeze(1) : at::Tensor(), 1.0, prod.narrow(1, k, 1), -c1,
              merged_bias.unsqueeze(1));
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
  // Gradients arrive in the weight's dtype; any other dtype is widened to the compute dtype.
  const auto widen = [&](const at::Tensor& t) { return t.scalar_type() == weight.scalar_type() ? t : t.to(cdt); };
  const at::Tensor g_w = widen(grad_merged_weight);
  // [G_W | g_b]: shared by M3 (with [W_d | b_d]) and M4/M5 (with W^T).
  const at::Tensor g_cat = rank_one ? with_column(g_w, widen(*grad_merged_bias)) : g_w;

  // Absent outputs are 0-element tensors, one per output (outputs must not alias each other).
  at::Tensor grad_weight = at::empty({0}, opts), grad_dw = at::empty({0}, opts), grad_db = at::empty({0}, opts);
  if (need_weight) {
    // M3: dW = c3 G_W - c1 (G_W W_d^T + g_b b_d^T), the bracket as one GEMM over K+1.
    const at::Tensor rhs = rank_one ? with_column(denoise_weight, *denoise_bias) : denoise_weight;
    grad_weight = at::empty({out, k}, opts);
    cuda::mm_acc_out(grad_weight, g_cat, rhs.t());
    scale_add(g_w, c3, grad_weight, -c1, grad_weight);  // in place: each element read, then written
  }
  if (need_denoise) {
    // M4, M5: [dW_d | db_d] = -c1 W^T [G_W | g_b].
    at::Tensor prod = at::empty({k, k + (rank_one ? 1 : 0)}, opts);
    cuda::mm_acc_out(prod, weight.t(), g_cat);
    grad_dw = at::empty({k, k}, opts);
    scale_add(at::Tensor(), 0.0, prod.narrow(1, 0, k), -c1, grad_dw);
    if (rank_one) {
      grad_db = at::empty({k}, opts);
      scale_add(at::Tensor(), 0.0, prod.narrow(1, k, 1), -c1, grad_db.unsqueeze(1));
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
