// CUDA kernel of drep::denoise_loss_fwd: the loss (docs/method.md, L1) and its gradients
// dL/dW_d, dL/db_d (L2) in one pass over x, nothing of size M x K returned or kept.
//
// Design (first version, written without a GPU; see "Fully fused" below):
// x (M x K) is processed in chunks of R rows (R K <= kChunkElems = 2^23 elements, at least 128
// rows), one after the other on the current stream. Per chunk:
//   1. noisy_input_kernel: x_noisy = a x + s eps (L1) into a chunk buffer in the GEMM dtype
//      (the input dtype: bf16/fp16/fp32/fp64); eps is the counter-based stream of csrc/philox.h
//      at (m, k) (N1), or the given noise; x and noise are read with their strides.
//   2. cuBLAS GEMM (aten::mm, float32 accumulate and result; tensor cores for bf16/fp16):
//      p = x_noisy W_d^T.
//   3. loss_epilogue_kernel: regenerates eps per element from its counter, D = p + b_d - eps,
//      |D| + D^2 summed per block (fixed-order tree), G' = sign(D) + 2 D written over the chunk
//      (in the GEMM dtype) and its column sums per 64-row tile (L2).
//   4. finalize_chunk_kernel: adds the chunk's block partials, in index order and in float64,
//      to the running loss and dL/db_d sums.
//   5. cuBLAS GEMM: dL/dW_d += G'^T x_noisy (chunk 0 writes, later chunks add in chunk order).
// At the end the sums are divided by n = M K. G' is stored without the 1 / n so that fp16 does
// not underflow (G = G' / n would be ~1e-9 for large batches); fp16 stores G' 2^-14 so that it
// overflows only past |D| ~ 5.4e8, and saturates there (grad_to_gemm).
// Deterministic: no atomics; every sum has a fixed order for fixed (M, K); cuBLAS GEMMs are
// bitwise reproducible for fixed shapes on one GPU model and cuBLAS version.
// Memory beyond the outputs: x_noisy, p and G' for one chunk (G' reuses p's buffer when both
// are float32/float64) of min(M K, 2^23) elements each: at most 64 MiB (bf16/fp16/fp32) or
// 128 MiB (fp64), plus R K / 2048 block partials (the 128-row floor exceeds this only for
// K > 2^16, where the K x K gradient is already 16 GiB).
//
// Fully fused (awaits GPU measurement): one tensor-core kernel per row tile would build the
// x_noisy tile in shared memory (prologue of GEMM 1), keep p in registers, apply bias, D, |D|,
// D^2 and G' in the epilogue, and feed G' and x_noisy straight into GEMM 2 (a split-K over rows
// with a fixed-order reduction of the K x K partials), so x_noisy, p and G' never reach global
// memory: for bf16, 2 bytes of traffic per element of x instead of about 20 (x, x_noisy twice
// more, p and G' each written and read) and one launch instead of five or six per chunk.
// Whether own mma/WMMA tiles, cuBLASLt epilogues or CUTLASS win, and by how much over this
// version, has to be measured on a GPU first.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>

#include "../common.h"
#include "../philox.h"
#include "common.cuh"

namespace drep {
namespace {

// Chunk buffer budget (elements). tests/cuda_host builds with a small one to run several chunks.
#ifndef DREP_LOSS_CHUNK_ELEMS
#define DREP_LOSS_CHUNK_ELEMS (int64_t(1) << 23)
#endif
constexpr int64_t kChunkElems = DREP_LOSS_CHUNK_ELEMS;
constexpr int64_t kMinChunkRows = 128;              // GEMM-friendly floor for very wide K
constexpr int kTileCols = 32;                       // epilogue block: 32 columns (one warp) ...
constexpr int kRowLanes = 8;                        // ... by 8 row lanes ...
constexpr int kRowsPerLane = 8;                     // ... each walking 8 rows:
constexpr int kTileRows = kRowLanes * kRowsPerLane;  // a 64 x 32 tile per block
constexpr int64_t kMaxGridY = 65535;
constexpr int kFinalThreads = 256;
static_assert(kTileCols * kRowLanes == kFinalThreads, "the epilogue block tree-reduces 256 values");

// Where eps comes from: the given noise tensor (any float dtype and strides) or the counter-based
// stream of `seed` (docs/method.md N1).
struct NoiseSource {
  const void* ptr;  // nullptr: the counter-based stream
  int64_t s0, s1;   // element strides of the noise tensor
  int kind;         // 0 float32, 1 float64, 2 float16, 3 bfloat16
  uint64_t seed;
  int64_t k;  // row length K (N1 counts ceil(K / 4) counters per row)
  // A seed drawn on the device (drep_kernels.rng.draw_seed): loaded by each kernel, never read
  // on the host, so a captured CUDA graph replays the draw and gets new noise every replay.
  // nullptr: `seed` holds an explicit seed, read on the host.
  const int64_t* seed_ptr;
};

// ns with its seed in hand: each kernel calls this once, before drawing any noise.
__device__ __forceinline__ NoiseSource with_seed(NoiseSource ns) {
  if (ns.seed_ptr != nullptr) {
    ns.seed = static_cast<uint64_t>(*ns.seed_ptr);
    ns.seed_ptr = nullptr;
  }
  return ns;
}

template <typename acc_t>
__device__ __forceinline__ acc_t eps_at(NoiseSource ns, int64_t m, int64_t col) {
  if (ns.ptr == nullptr) {
    // N1: a pure function of (seed, m, col) (64-bit counters). One Philox call per element
    // (the epilogue's threads own columns, not groups of four): a GPU run will tell whether
    // regrouping pays.
    return static_cast<acc_t>(
        noise_at(ns.seed, static_cast<uint64_t>(m), static_cast<uint64_t>(col), static_cast<uint64_t>(ns.k)));
  }
  const int64_t off = m * ns.s0 + col * ns.s1;
  switch (ns.kind) {
    case 0:
      return static_cast<acc_t>(static_cast<const float*>(ns.ptr)[off]);
    case 1:
      return static_cast<acc_t>(static_cast<const double*>(ns.ptr)[off]);
    case 2:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(ns.ptr)[off]));
    default:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(ns.ptr)[off]));
  }
}

// L1 prologue: x_noisy[r, k] = a x[row0 + r, k] + s eps[row0 + r, k] for the chunk's rows,
// written row-major (ld = K) in the GEMM dtype. One thread per group of four columns (one N1
// counter: one Philox call gives the group's four normals).
template <typename scalar_t, typename gemm_t, typename acc_t>
__global__ void noisy_input_kernel(const scalar_t* x, int64_t xs0, int64_t xs1, NoiseSource ns, acc_t a, acc_t s,
                                   int64_t row0, int64_t rows, int64_t k, gemm_t* x_noisy) {
  ns = with_seed(ns);
  const int64_t groups = (k + 3) / 4;
  const int64_t n = rows * groups;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t r = i / groups;
    const int64_t q = i - r * groups;
    const int64_t m = row0 + r;
    float four[4];
    if (ns.ptr == nullptr) {
      philox_normal4(ns.seed, static_cast<uint64_t>(m) * static_cast<uint64_t>(groups) + static_cast<uint64_t>(q),
                     four);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = 4 * q + j;
      if (col < k) {
        const acc_t e = ns.ptr == nullptr ? static_cast<acc_t>(four[j]) : eps_at<acc_t>(ns, m, col);
        x_noisy[r * k + col] = static_cast<gemm_t>(a * static_cast<acc_t>(x[m * xs0 + col * xs1]) + s * e);
      }
    }
  }
}

// G' = sign(D) + 2 D in the GEMM dtype, times kGradScale<gemm_t> (undone on dL/dW_d at the end).
// Every non-zero |G'| is at least 1, so float16 can store G' 2^-14 exactly as it stores G' (2^-14
// is its smallest normal: no value loses precision), which moves its overflow from |G'| > 65504
// (|D| ~ 3.3e4) to |G'| > 65504 2^14 (|D| ~ 5.4e8). Beyond that float16 saturates at its largest
// finite value instead of becoming inf (that element's gradient is clipped, not lost); NaN stays
// NaN. bfloat16, float32 and float64 have float32's range or more and store G' as it is.
template <typename gemm_t>
constexpr double kGradScale = std::is_same_v<gemm_t, at::Half> ? 1.0 / 16384.0 : 1.0;

template <typename gemm_t, typename acc_t>
__device__ __forceinline__ gemm_t grad_to_gemm(acc_t grad) {
  if constexpr (std::is_same_v<gemm_t, at::Half>) {
    constexpr acc_t kMax = 65504;  // float16's largest finite value
    const acc_t v = grad * static_cast<acc_t>(kGradScale<gemm_t>);
    return static_cast<gemm_t>(v > kMax ? kMax : (v < -kMax ? -kMax : v));
  } else {
    return static_cast<gemm_t>(grad);
  }
}

// L1 / L2 epilogue over a 64 x 32 tile of the chunk: D = p + b_d - eps; the tile's sum of
// |D| + D^2 goes to loss_part[tile]; with g != nullptr, G' = sign(D) + 2 D (sign(0) = 0) is
// written at p's position (through grad_to_gemm) and, with col_part != nullptr, the tile's
// column sums of G' go to col_part[blockIdx.y, col]. g may alias p (same dtype): each element is read, then written,
// by one thread. All sums run in a fixed order.
template <typename gemm_t, typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    loss_epilogue_kernel(const acc_t* p, gemm_t* g, const acc_t* bias, NoiseSource ns, int64_t row0, int64_t rows,
                         int64_t k, acc_t* loss_part, acc_t* col_part) {
  ns = with_seed(ns);
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + tx;
  const int64_t tile_row0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  acc_t loss = 0, col_sum = 0;
  if (col < k) {
    const acc_t b = bias != nullptr ? bias[col] : acc_t(0);
#pragma unroll
    for (int j = 0; j < kRowsPerLane; ++j) {
      const int64_t r = tile_row0 + ty + kRowLanes * j;
      if (r < rows) {
        const int64_t i = r * k + col;
        const acc_t d = p[i] + b - eps_at<acc_t>(ns, row0 + r, col);
        loss += (d < acc_t(0) ? -d : d) + d * d;
        const acc_t grad = (d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0))) + acc_t(2) * d;
        col_sum += grad;
        if (g != nullptr) {
          g[i] = grad_to_gemm<gemm_t>(grad);
        }
      }
    }
  }
  __shared__ acc_t s_loss[kFinalThreads];
  __shared__ acc_t s_col[kRowLanes][kTileCols];
  const int t = ty * kTileCols + tx;
  s_loss[t] = loss;
  s_col[ty][tx] = col_sum;
  __syncthreads();
  for (int half = kFinalThreads / 2; half > 0; half /= 2) {
    if (t < half) {
      s_loss[t] += s_loss[t + half];
    }
    __syncthreads();
  }
  if (t == 0) {
    loss_part[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = s_loss[0];
  }
  if (col_part != nullptr && ty == 0 && col < k) {
    acc_t c = 0;
#pragma unroll
    for (int lane = 0; lane < kRowLanes; ++lane) {
      c += s_col[lane][tx];
    }
    col_part[static_cast<int64_t>(blockIdx.y) * k + col] = c;
  }
}

// Adds one chunk's partials to the running sums, in float64 and in index order: every block
// does its columns of col_part (tiles in order) into grad_bias_sum; block 0 also reduces
// loss_part (strided per thread, then a fixed tree) into loss_sum[0].
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    finalize_chunk_kernel(const acc_t* loss_part, int64_t n_loss, double* loss_sum, const acc_t* col_part,
                          int64_t n_tiles, int64_t k, double* grad_bias_sum) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kFinalThreads + threadIdx.x;
  if (col_part != nullptr && col < k) {
    double c = 0;
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      c += static_cast<double>(col_part[tile * k + col]);
    }
    grad_bias_sum[col] += c;
  }
  if (blockIdx.x == 0) {  // uniform per block: the __syncthreads below are reached by all its threads
    __shared__ double s[kFinalThreads];
    double v = 0;
    const int t = static_cast<int>(threadIdx.x);
    for (int64_t i = t; i < n_loss; i += kFinalThreads) {
      v += static_cast<double>(loss_part[i]);
    }
    s[t] = v;
    __syncthreads();
    for (int half = kFinalThreads / 2; half > 0; half /= 2) {
      if (t < half) {
        s[t] += s[t + half];
      }
      __syncthreads();
    }
    if (t == 0) {
      loss_sum[0] += s[0];
    }
  }
}

int noise_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return 0;
    case at::kDouble:
      return 1;
    case at::kHalf:
      return 2;
    case at::kBFloat16:
      return 3;
    default:
      TORCH_CHECK(false, "drep: noise must be float16, bfloat16, float32 or float64, got ", t);
  }
  return -1;  // unreachable
}

// Rows per chunk: the element budget, a multiple of 128 (at least 128), within the epilogue's
// grid.y limit, and never more than M.
int64_t chunk_rows(int64_t m, int64_t k) {
  int64_t r = std::max<int64_t>(kChunkElems / k / kMinChunkRows * kMinChunkRows, kMinChunkRows);
  r = std::min<int64_t>(r, kMaxGridY * kTileRows);
  return std::min<int64_t>(r, m);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> denoise_loss_chunks(
    const at::Tensor& x, const at::Tensor& denoise_weight, const std::optional<at::Tensor>& denoise_bias, double a,
    double s, const NoiseSource& ns, bool compute_grad) {
  using acc_t = at::opmath_type<scalar_t>;
#if DREP_HALF_GEMM_FP32_OUT
  using gemm_t = scalar_t;  // bf16/fp16 operands straight to the tensor cores
#else
  using gemm_t = acc_t;
#endif
  const auto cdt = c10::CppTypeToScalarType<acc_t>::value;
  const auto gdt = c10::CppTypeToScalarType<gemm_t>::value;
  const int64_t m = x.size(0), k = x.size(1);
  const auto opts = x.options().dtype(cdt);
  const bool has_bias = denoise_bias.has_value();
  const bool bias_grad = compute_grad && has_bias;
  const auto stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor w_t = denoise_weight.to(gdt).t();  // p = x_noisy W_d^T; a copy only when upcasting
  const at::Tensor bias = has_bias ? denoise_bias->to(cdt).contiguous() : at::Tensor();

  const int64_t rows_max = chunk_rows(m, k);
  const int64_t tiles_x = (k + kTileCols - 1) / kTileCols;
  const int64_t tiles_y_max = (rows_max + kTileRows - 1) / kTileRows;
  at::Tensor x_noisy = at::empty({rows_max, k}, x.options().dtype(gdt));
  at::Tensor p = at::empty({rows_max, k}, opts);
  at::Tensor g;
  if (compute_grad) {
    g = gdt == cdt ? p : at::empty({rows_max, k}, x.options().dtype(gdt));
  }
  at::Tensor loss_part = at::empty({tiles_x * tiles_y_max}, opts);
  at::Tensor col_part = bias_grad ? at::empty({tiles_y_max, k}, opts) : at::Tensor();
  at::Tensor loss_sum = at::zeros({1}, x.options().dtype(at::kDouble));
  at::Tensor grad_bias_sum = bias_grad ? at::zeros({k}, x.options().dtype(at::kDouble)) : at::Tensor();
  at::Tensor grad_weight = compute_grad ? at::empty({k, k}, opts) : at::Tensor();
  at::Tensor grad_weight_chunk = compute_grad && rows_max < m ? at::empty({k, k}, opts) : at::Tensor();

  for (int64_t row0 = 0; row0 < m; row0 += rows_max) {
    const int64_t rows = std::min(rows_max, m - row0);
    at::Tensor x_noisy_c = x_noisy.narrow(0, 0, rows);
    at::Tensor p_c = p.narrow(0, 0, rows);

    const unsigned int noisy_blocks = cuda::blocks_for(rows * ((k + 3) / 4));
    DREP_LAUNCH(noisy_blocks, cuda::kThreads, 0, stream, noisy_input_kernel<scalar_t, gemm_t, acc_t>)(
        x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), ns, static_cast<acc_t>(a), static_cast<acc_t>(s),
        row0, rows, k, x_noisy_c.mutable_data_ptr<gemm_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    cuda::mm_acc_out(p_c, x_noisy_c, w_t);  // L1: p = x_noisy W_d^T (b_d added in the epilogue)

    const int64_t tiles_y = (rows + kTileRows - 1) / kTileRows;
    const dim3 grid(static_cast<unsigned int>(tiles_x), static_cast<unsigned int>(tiles_y));
    const dim3 block(kTileCols, kRowLanes);
    DREP_LAUNCH(grid, block, 0, stream, loss_epilogue_kernel<gemm_t, acc_t>)(
        p_c.const_data_ptr<acc_t>(), compute_grad ? g.mutable_data_ptr<gemm_t>() : nullptr,
        has_bias ? bias.const_data_ptr<acc_t>() : nullptr, ns, row0, rows, k, loss_part.mutable_data_ptr<acc_t>(),
        bias_grad ? col_part.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const auto final_blocks = static_cast<unsigned int>((k + kFinalThreads - 1) / kFinalThreads);
    DREP_LAUNCH(final_blocks, kFinalThreads, 0, stream, finalize_chunk_kernel<acc_t>)(
        loss_part.const_data_ptr<acc_t>(), tiles_x * tiles_y, loss_sum.mutable_data_ptr<double>(),
        bias_grad ? col_part.const_data_ptr<acc_t>() : nullptr, tiles_y, k,
        bias_grad ? grad_bias_sum.mutable_data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (compute_grad) {
      // L2: dL/dW_d = G^T x_noisy, summed over chunks in chunk order (G = G' / n, applied below).
      const at::Tensor g_c = g.narrow(0, 0, rows);
      if (row0 == 0) {
        cuda::mm_acc_out(grad_weight, g_c.t(), x_noisy_c);
      } else {
        cuda::mm_acc_out(grad_weight_chunk, g_c.t(), x_noisy_c);
        grad_weight.add_(grad_weight_chunk);
      }
    }
  }

  const double n = static_cast<double>(m) * static_cast<double>(k);
  at::Tensor loss = loss_sum.div(n).to(cdt).reshape({});  // L1: mean |D| + mean D^2
  // Absent outputs are 0-element tensors, one per output (outputs must not alias each other).
  if (!compute_grad) {
    return {loss, at::empty({0}, opts), at::empty({0}, opts)};
  }
  grad_weight.div_(n * kGradScale<gemm_t>);  // G = G' / n, G' stored times kGradScale
  at::Tensor grad_bias = bias_grad ? grad_bias_sum.div(n).to(cdt) : at::empty({0}, opts);
  return {loss, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> denoise_loss_fwd_cuda(
    const at::Tensor& x, const at::Tensor& denoise_weight, const std::optional<at::Tensor>& denoise_bias, double a,
    double s, const std::optional<at::Tensor>& noise, const at::Tensor& seed, bool compute_grad) {
  TORCH_CHECK(x.dim() == 2, "drep: x must be 2-D (M, K), got ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(denoise_weight.sizes() == at::IntArrayRef({k, k}), "drep: denoise_weight must be (", k, ", ", k,
              "), got ", denoise_weight.sizes());
  TORCH_CHECK(!denoise_bias.has_value() || denoise_bias->sizes() == at::IntArrayRef({k}),
              "drep: denoise_bias must be (", k, ",)");
  TORCH_CHECK(denoise_weight.scalar_type() == x.scalar_type() &&
                  (!denoise_bias.has_value() || denoise_bias->scalar_type() == x.scalar_type()),
              "drep: x, denoise_weight and denoise_bias must have one dtype");
  const auto device = x.device();
  cuda::check_cuda(x, "x", device);
  cuda::check_cuda(denoise_weight, "denoise_weight", device);
  if (denoise_bias.has_value()) {
    cuda::check_cuda(*denoise_bias, "denoise_bias", device);
  }
  NoiseSource ns{nullptr, 0, 0, 0, 0, k, nullptr};
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == x.sizes(), "drep: noise must have x's shape ", x.sizes(), ", got ", noise->sizes());
    cuda::check_cuda(*noise, "noise", device);
    ns.kind = noise_kind(noise->scalar_type());
    ns.s0 = noise->stride(0);
    ns.s1 = noise->stride(1);
    ns.ptr = m * k > 0 ? noise->const_data_ptr() : nullptr;
  } else {
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, "drep: seed must be a 0-d int64 tensor");
    if (seed.device() == device) {
      ns.seed_ptr = seed.const_data_ptr<int64_t>();  // drawn on the device: the kernels load it
    } else {
      // An explicit seed, read on the host: a CPU tensor, so this never syncs the device.
      TORCH_CHECK(seed.device().is_cpu(), "drep: seed must be on x's device or the CPU, got ", seed.device());
      ns.seed = static_cast<uint64_t>(seed.item<int64_t>());
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  const auto cdt = compute_dtype(x.scalar_type());
  const auto opts = x.options().dtype(cdt);
  // Absent outputs are 0-element tensors, one per output (outputs must not alias each other).
  const auto empty = [&] { return at::empty({0}, opts); };
  if (m == 0 || k == 0) {  // an empty batch has loss 0 (not 0/0) and zero gradients
    return {at::zeros({}, opts), compute_grad ? at::zeros({k, k}, opts) : empty(),
            compute_grad && denoise_bias.has_value() ? at::zeros({k}, opts) : empty()};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "drep_denoise_loss_fwd", [&] {
    result = denoise_loss_chunks<scalar_t>(x, denoise_weight, denoise_bias, a, s, ns, compute_grad);
  });
  return result;
}

// One thread per element through eps_at, the loss epilogue's noise (test hook only).
__global__ void noise_per_element_kernel(NoiseSource ns, int64_t row0, int64_t rows, float* out) {
  ns = with_seed(ns);
  const int64_t n = rows * ns.k;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t r = i / ns.k;
    out[i] = eps_at<float>(ns, row0 + r, i - r * ns.k);
  }
}

// drep::_denoise_noise (test hook, csrc/ops.cpp): eps rows as this file's kernels draw them:
// the prologue's groups of four (noisy_input_kernel with x = 0, a = 0, s = 1), or per element.
at::Tensor denoise_noise_cuda(const at::Tensor& like, const at::Tensor& seed, int64_t row0, int64_t rows,
                              int64_t cols, bool per_element) {
  TORCH_CHECK(seed.device().is_cpu() && seed.dim() == 0 && seed.scalar_type() == at::kLong,
              "seed must be a 0-d int64 CPU tensor");
  TORCH_CHECK(row0 >= 0 && rows >= 0 && cols >= 0, "row0, rows and cols must be >= 0");
  const c10::cuda::CUDAGuard guard(like.device());
  const auto opts = like.options().dtype(at::kFloat);
  at::Tensor out = at::empty({rows, cols}, opts);
  if (rows * cols == 0) return out;
  NoiseSource ns{};
  ns.ptr = nullptr;
  ns.seed = static_cast<uint64_t>(seed.item<int64_t>());
  ns.k = cols;
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (per_element) {
    DREP_LAUNCH(cuda::blocks_for(rows * cols), cuda::kThreads, 0, stream, noise_per_element_kernel)(
        ns, row0, rows, out.mutable_data_ptr<float>());
  } else {
    const at::Tensor zero = at::zeros({1}, opts);  // x, read with strides 0
    const unsigned int blocks = cuda::blocks_for(rows * ((cols + 3) / 4));
    DREP_LAUNCH(blocks, cuda::kThreads, 0, stream, noisy_input_kernel<float, float, float>)(
        zero.const_data_ptr<float>(), 0, 0, ns, 0.0f, 1.0f, row0, rows, cols, out.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

DREP_CUDA_KERNELS(m) {
  m.impl("denoise_loss_fwd", &denoise_loss_fwd_cuda);
  m.impl("_denoise_noise", &denoise_noise_cuda);
}

}  // namespace drep
