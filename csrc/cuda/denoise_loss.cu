// CUDA kernel of drep::denoise_loss_fwd: the loss (docs/method.md, L1) and its gradients
// dL/dW_d, dL/db_d (L2) in one pass over x, nothing of size M x K returned or kept.
//
// Design. x (M x K) is processed in chunks of R rows (R K <= kChunkElems = 2^23 elements, R a
// multiple of 128 and at least 128), one after the other on the current stream. Per chunk, five
// launches:
//   1. noisy_input_kernel: x_noisy = a x + s eps (L1), rounded once to the input dtype (the GEMM
//      dtype), into a chunk buffer; eps is N1's counter-based stream (csrc/philox.h), one Philox
//      call per group of four columns, or the given noise; x and noise are read with strides.
//   2. GEMM 1 (cuBLAS, common.cuh gemm, beta = 0): p = x_noisy W_d^T, float32 result.
//   3. loss_epilogue_kernel: eps regenerated per group of four (one Philox call each, as in 1),
//      D = p + b_d - eps, |D| + D^2 summed per block (fixed-order tree), G' = sign(D) + 2 D
//      written over the chunk in the GEMM dtype, and its column sums per 64-row tile (L2).
//   4. finalize_chunk_kernel: adds the chunk's block partials, in index order and in float64,
//      to the running loss and dL/db_d sums (the first chunk starts them, the last writes the
//      results divided by M K in the result dtype: no fill before the loop, no launch after).
//   5. GEMM 2 (cuBLAS, common.cuh gemm): dL/dW_d = alpha G'^T x_noisy accumulated in float32 in
//      place: chunk 0 writes (beta = 0), later chunks add (beta = 1), alpha = 1 / (M K) (G = G' /
//      (M K), L2) times the float16 scale below.
// GEMM operands, results and compute types follow the policy of common.cuh (bf16/fp16 operands
// on tensor cores with float32 accumulation; float32 in float32 or TF32 as torch's matmuls;
// float64 in float64). Nothing is launched before or after the loop.
//
// Counted, bfloat16 input, M = 12608 rows, per element of x (M K elements). Bytes are the least
// HBM traffic of each launch (every operand read once; a GEMM's re-reads of its tiles from L2
// not counted); "W_d" and "C" are the per-chunk K x K terms spread over the chunk's elements.
//
//   launch (per chunk)      reads (B/elem)           writes (B/elem)      Philox calls/elem
//   noisy_input_kernel      x 2                      x_noisy 2            1/4
//   GEMM 1 (beta 0)         x_noisy 2 + W_d          p 4 (float32)        -
//   loss_epilogue_kernel    p 4                      G' 2, col sums 1/16  1/4
//   finalize_chunk_kernel   col sums 1/16            -                    -
//   GEMM 2 (beta 0, then 1) G' 2 + x_noisy 2 + C     C                    -
//
//                                     K = 768             K = 3072
//   rows per chunk R, chunks          10880, 2            2688, 5
//   launches (5 per chunk)            10                  25
//   W_d reads (2 K^2 B per chunk)     0.24 B/elem         2.44 B/elem
//   C (4 K^2 B, then 8 K^2 per chunk) 0.73 B/elem         8.77 B/elem
//   total HBM traffic                 21.1 B/elem         31.3 B/elem
//                                     (204 MB)            (1.21 GB)
//   Philox calls                      1/2 per element (two passes of one call per four)
//   GEMM FLOPs, each of the two       14.9 GFLOP          238 GFLOP      (2 M K^2)
//   workspace (x_noisy 2 + p 4 + G' 2 B per chunk element, R K <= 2^23)
//                                     63.75 MiB           63.0 MiB
// (float32 input: 32 B/elem before the K x K terms instead of 20 (x, x_noisy and G' at 4 B), the
// same 64 MiB bound (G' overwrites p's buffer); float64: twice float32's bytes, 128 MiB. A cuBLAS
// call counts as one launch. Given noise: no Philox call, its bytes read twice.) Beyond the
// workspace: the block partials, R K / 16 B per chunk (0.5 MiB), and the outputs. The C term is
// the price of the bounded workspace: it is 8 K / R B per element for every chunk after the
// first, so it grows as K^2 for a fixed 2^23-element chunk (R = 2^23 / K).
// G' is stored without the 1 / n so that fp16 does not underflow (G = G' / n would be ~1e-9 for
// large batches); fp16 stores G' 2^-14 so that it overflows only past |D| ~ 5.4e8, and saturates
// there (grad_to_gemm); GEMM 2's alpha undoes both.
// Deterministic: no atomics; every sum has a fixed order for fixed (M, K); cuBLAS GEMMs are
// bitwise reproducible for fixed shapes on one GPU model and cuBLAS version.
//
// Fully fused (awaits GPU measurement): one tensor-core kernel per row tile would build the
// x_noisy tile in shared memory (prologue of GEMM 1), keep p in registers, apply bias, D, |D|,
// D^2 and G' in the epilogue, and feed G' and x_noisy straight into GEMM 2 (a split-K over rows
// with a fixed-order reduction of the K x K partials), so x_noisy, p and G' never reach global
// memory: for bf16, 2 bytes of traffic per element of x instead of about 20, and one launch per
// chunk instead of five.
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
constexpr int64_t kMinChunkRows = 128;  // GEMM-friendly floor for very wide K
// The epilogue block: 32 groups of four columns (one warp: 128 columns) by 8 row lanes, each
// lane walking 8 rows: a 64 x 128 tile, 32 elements and 8 Philox calls per thread.
constexpr int kGroupLanes = 32;
constexpr int kRowLanes = 8;
constexpr int kRowsPerLane = 8;
constexpr int kTileCols = 4 * kGroupLanes;
constexpr int kTileRows = kRowLanes * kRowsPerLane;
constexpr int64_t kMaxGridY = 65535;
constexpr int kFinalThreads = 256;
static_assert(kGroupLanes * kRowLanes == kFinalThreads, "the epilogue block tree-reduces 256 values");

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
__device__ __forceinline__ acc_t given_noise(const NoiseSource& ns, int64_t m, int64_t col) {
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

// eps of row m, columns 4q .. 4q + 3 (entries past K are not eps and never read). Seeded: N1's
// counter m ceil(K / 4) + q (64-bit), one Philox call for the four. Every kernel of this file
// draws its noise here, the prologue and the epilogue alike. e is indexed by constants only
// (its callers unroll), so it stays in registers.
template <typename acc_t>
__device__ __forceinline__ void noise_group(const NoiseSource& ns, int64_t m, int64_t q, acc_t e[4]) {
  if (ns.ptr == nullptr) {
    float four[4];
    philox_normal4(ns.seed, static_cast<uint64_t>(m) * static_cast<uint64_t>((ns.k + 3) / 4) + static_cast<uint64_t>(q),
                   four);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      e[j] = static_cast<acc_t>(four[j]);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t col = 4 * q + j;
    e[j] = col < ns.k ? given_noise<acc_t>(ns, m, col) : acc_t(0);
  }
}

// L1 prologue: x_noisy[r, k] = a x[row0 + r, k] + s eps[row0 + r, k] for the chunk's rows,
// written row-major (ld = K) in the GEMM dtype. One thread per group of four columns.
template <typename scalar_t, typename acc_t>
__global__ void noisy_input_kernel(const scalar_t* x, int64_t xs0, int64_t xs1, NoiseSource ns, acc_t a, acc_t s,
                                   int64_t row0, int64_t rows, int64_t k, scalar_t* x_noisy) {
  ns = with_seed(ns);
  const int64_t groups = (k + 3) / 4;
  const int64_t n = rows * groups;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t r = i / groups;
    const int64_t q = i - r * groups;
    const int64_t m = row0 + r;
    acc_t e[4];
    noise_group(ns, m, q, e);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = 4 * q + j;
      if (col < k) {
        x_noisy[r * k + col] = static_cast<scalar_t>(a * static_cast<acc_t>(x[m * xs0 + col * xs1]) + s * e[j]);
      }
    }
  }
}

// G' = sign(D) + 2 D in the GEMM dtype, times kGradScale<gemm_t> (undone by GEMM 2's alpha).
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

// The epilogue's thread layout, shared with the noise test hook: thread (x, y) of block (bx, by)
// owns the group of four columns bx kGroupLanes + x and the chunk rows by kTileRows + y +
// kRowLanes j, j < kRowsPerLane.
struct EpilogueThread {
  int64_t group;
  int64_t first_row;

  __device__ __forceinline__ static EpilogueThread here() {
    return {static_cast<int64_t>(blockIdx.x) * kGroupLanes + threadIdx.x,
            static_cast<int64_t>(blockIdx.y) * kTileRows + threadIdx.y};
  }
  __device__ __forceinline__ int64_t row(int j) const { return first_row + kRowLanes * j; }
};

dim3 epilogue_grid(int64_t rows, int64_t k) {
  const int64_t tiles_y = (rows + kTileRows - 1) / kTileRows;
  TORCH_CHECK(tiles_y <= kMaxGridY, "drep: ", rows, " rows exceed the epilogue's grid");
  return dim3(static_cast<unsigned int>((k + kTileCols - 1) / kTileCols), static_cast<unsigned int>(tiles_y));
}

const dim3 kEpilogueBlock(kGroupLanes, kRowLanes);

// L1 / L2 epilogue over a 64 x 128 tile of the chunk: D = p + b_d - eps; the tile's sum of
// |D| + D^2 goes to loss_part[tile]; with g != nullptr, G' = sign(D) + 2 D (sign(0) = 0) is
// written at p's position (through grad_to_gemm) and, with col_part != nullptr, the tile's
// column sums of G' go to col_part[blockIdx.y, col]. g may alias p (same dtype): each element is
// read, then written, by one thread. b_d (input dtype, stride bs) may be nullptr. All sums run in
// a fixed order; the per-thread arrays are indexed by unrolled constants only (registers).
template <typename gemm_t, typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    loss_epilogue_kernel(const acc_t* p, gemm_t* g, const gemm_t* bias, int64_t bs, NoiseSource ns, int64_t row0,
                         int64_t rows, int64_t k, acc_t* loss_part, acc_t* col_part) {
  ns = with_seed(ns);
  const EpilogueThread me = EpilogueThread::here();
  const int64_t col0 = 4 * me.group;
  acc_t loss = 0;
  acc_t col_sum[4] = {0, 0, 0, 0};
  if (col0 < k) {
    acc_t b[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      b[j] = bias != nullptr && col0 + j < k ? static_cast<acc_t>(bias[(col0 + j) * bs]) : acc_t(0);
    }
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) {
      const int64_t r = me.row(i);
      if (r < rows) {
        acc_t e[4];
        noise_group(ns, row0 + r, me.group, e);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (col0 + j < k) {
            const int64_t at = r * k + col0 + j;
            const acc_t d = p[at] + b[j] - e[j];
            loss += (d < acc_t(0) ? -d : d) + d * d;
            const acc_t grad = (d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0))) + acc_t(2) * d;
            col_sum[j] += grad;
            if (g != nullptr) {
              g[at] = grad_to_gemm<gemm_t>(grad);
            }
          }
        }
      }
    }
  }
  __shared__ acc_t s_loss[kFinalThreads];
  __shared__ acc_t s_col[kRowLanes][kTileCols];
  const int t = static_cast<int>(threadIdx.y) * kGroupLanes + static_cast<int>(threadIdx.x);
  s_loss[t] = loss;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    s_col[threadIdx.y][4 * threadIdx.x + j] = col_sum[j];
  }
  cuda::block_tree_sum<kFinalThreads>(s_loss, t);  // its first barrier also publishes s_col
  if (t == 0) {
    loss_part[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = s_loss[0];
  }
  // One thread per column of the tile adds its row lanes in order.
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + t;
  if (col_part != nullptr && t < kTileCols && col < k) {
    acc_t c = 0;
#pragma unroll
    for (int lane = 0; lane < kRowLanes; ++lane) {
      c += s_col[lane][t];
    }
    col_part[static_cast<int64_t>(blockIdx.y) * k + col] = c;
  }
}

// Adds one chunk's partials to the running sums, in float64 and in index order: every block
// does its columns of col_part (tiles in order) into grad_bias_sum; block 0 also reduces
// loss_part (strided per thread, then a fixed tree) into loss_sum[0]. The first chunk starts
// the sums (no fill launch before the loop); the last writes the results, loss_sum / n and
// grad_bias_sum / n in acc_t (no division or cast launch after it). One chunk: both.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    finalize_chunk_kernel(const acc_t* loss_part, int64_t n_loss, double* loss_sum, const acc_t* col_part,
                          int64_t n_tiles, int64_t k, double* grad_bias_sum, bool first, bool last, double n,
                          acc_t* loss_out, acc_t* grad_bias_out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kFinalThreads + threadIdx.x;
  if (col_part != nullptr && col < k) {
    double c = first ? 0.0 : grad_bias_sum[col];
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      c += static_cast<double>(col_part[tile * k + col]);
    }
    if (last) {
      grad_bias_out[col] = static_cast<acc_t>(c / n);
    } else {
      grad_bias_sum[col] = c;
    }
  }
  if (blockIdx.x == 0) {  // uniform per block: the __syncthreads below are reached by all its threads
    __shared__ double s[kFinalThreads];
    double v = 0;
    const int t = static_cast<int>(threadIdx.x);
    for (int64_t i = t; i < n_loss; i += kFinalThreads) {
      v += static_cast<double>(loss_part[i]);
    }
    s[t] = v;
    cuda::block_tree_sum<kFinalThreads>(s, t);
    if (t == 0) {
      const double total = (first ? 0.0 : loss_sum[0]) + s[0];
      if (last) {
        loss_out[0] = static_cast<acc_t>(total / n);  // L1: mean |D| + mean D^2
      } else {
        loss_sum[0] = total;
      }
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
  // GEMM operands in the input dtype (scalar_t), results and sums in acc_t (common.cuh gemm).
  using acc_t = at::opmath_type<scalar_t>;
  const auto cdt = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t m = x.size(0), k = x.size(1);
  const auto opts = x.options().dtype(cdt);
  const bool has_bias = denoise_bias.has_value();
  const bool bias_grad = compute_grad && has_bias;
  const auto stream = at::cuda::getCurrentCUDAStream();

  const int64_t rows_max = chunk_rows(m, k);
  const dim3 grid_max = epilogue_grid(rows_max, k);
  at::Tensor x_noisy = at::empty({rows_max, k}, x.options());
  at::Tensor p = at::empty({rows_max, k}, opts);
  at::Tensor g;
  if (compute_grad) {
    g = std::is_same_v<scalar_t, acc_t> ? p : at::empty({rows_max, k}, x.options());
  }
  at::Tensor loss_part = at::empty({static_cast<int64_t>(grid_max.x) * grid_max.y}, opts);
  at::Tensor col_part = bias_grad ? at::empty({static_cast<int64_t>(grid_max.y), k}, opts) : at::Tensor();
  // The running float64 sums (started by the first chunk's finalize: no fill) and the results.
  at::Tensor loss_sum = at::empty({1}, x.options().dtype(at::kDouble));
  at::Tensor grad_bias_sum = bias_grad ? at::empty({k}, x.options().dtype(at::kDouble)) : at::Tensor();
  at::Tensor loss = at::empty({}, opts);
  // Absent outputs are 0-element tensors, one per output (outputs must not alias each other).
  at::Tensor grad_weight = compute_grad ? at::empty({k, k}, opts) : at::empty({0}, opts);
  at::Tensor grad_bias = bias_grad ? at::empty({k}, opts) : at::empty({0}, opts);
  const double n = static_cast<double>(m) * static_cast<double>(k);

  for (int64_t row0 = 0; row0 < m; row0 += rows_max) {
    const int64_t rows = std::min(rows_max, m - row0);
    const at::Tensor x_noisy_c = x_noisy.narrow(0, 0, rows);
    const at::Tensor p_c = p.narrow(0, 0, rows);

    const unsigned int noisy_blocks = cuda::blocks_for(rows * ((k + 3) / 4));
    DREP_LAUNCH(noisy_blocks, cuda::kThreads, 0, stream, noisy_input_kernel<scalar_t, acc_t>)(
        x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), ns, static_cast<acc_t>(a), static_cast<acc_t>(s),
        row0, rows, k, x_noisy_c.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    cuda::gemm(p_c, x_noisy_c, denoise_weight.t());  // L1: p = x_noisy W_d^T (b_d added in the epilogue)

    const dim3 grid = epilogue_grid(rows, k);
    DREP_LAUNCH(grid, kEpilogueBlock, 0, stream, loss_epilogue_kernel<scalar_t, acc_t>)(
        p_c.const_data_ptr<acc_t>(), compute_grad ? g.mutable_data_ptr<scalar_t>() : nullptr,
        has_bias ? denoise_bias->const_data_ptr<scalar_t>() : nullptr, has_bias ? denoise_bias->stride(0) : 0, ns,
        row0, rows, k, loss_part.mutable_data_ptr<acc_t>(), bias_grad ? col_part.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const auto final_blocks = static_cast<unsigned int>((k + kFinalThreads - 1) / kFinalThreads);
    DREP_LAUNCH(final_blocks, kFinalThreads, 0, stream, finalize_chunk_kernel<acc_t>)(
        loss_part.const_data_ptr<acc_t>(), static_cast<int64_t>(grid.x) * grid.y, loss_sum.mutable_data_ptr<double>(),
        bias_grad ? col_part.const_data_ptr<acc_t>() : nullptr, grid.y, k,
        bias_grad ? grad_bias_sum.mutable_data_ptr<double>() : nullptr, row0 == 0, row0 + rows == m, n,
        loss.mutable_data_ptr<acc_t>(), bias_grad ? grad_bias.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (compute_grad) {
      // L2: dL/dW_d = G^T x_noisy with G = G' / n and G' stored times kGradScale: alpha undoes
      // both. Accumulated in place over the chunks, in chunk order.
      cuda::gemm(grad_weight, g.narrow(0, 0, rows).t(), x_noisy_c, 1.0 / (n * kGradScale<scalar_t>),
                 row0 > 0 ? 1.0 : 0.0);
    }
  }

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

// eps as the loss epilogue draws it: its thread layout and noise_group (test hook only).
__global__ void __launch_bounds__(kFinalThreads)
    epilogue_noise_kernel(NoiseSource ns, int64_t row0, int64_t rows, float* out) {
  ns = with_seed(ns);
  const EpilogueThread me = EpilogueThread::here();
  const int64_t col0 = 4 * me.group;
  if (col0 >= ns.k) {
    return;
  }
#pragma unroll
  for (int i = 0; i < kRowsPerLane; ++i) {
    const int64_t r = me.row(i);
    if (r < rows) {
      float e[4];
      noise_group(ns, row0 + r, me.group, e);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (col0 + j < ns.k) {
          out[r * ns.k + col0 + j] = e[j];
        }
      }
    }
  }
}

// drep::_denoise_noise (test hook, csrc/ops.cpp): eps rows as this file's kernels draw them:
// the prologue's (noisy_input_kernel with x = 0, a = 0, s = 1), or with per_element the loss
// epilogue's (epilogue_noise_kernel). The name per_element is the op schema's, from when the
// epilogue drew one element per Philox call; it now draws groups of four in its own layout.
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
    DREP_LAUNCH(epilogue_grid(rows, cols), kEpilogueBlock, 0, stream, epilogue_noise_kernel)(
        ns, row0, rows, out.mutable_data_ptr<float>());
  } else {
    const at::Tensor zero = at::zeros({1}, opts);  // x, read with strides 0
    const unsigned int blocks = cuda::blocks_for(rows * ((cols + 3) / 4));
    DREP_LAUNCH(blocks, cuda::kThreads, 0, stream, noisy_input_kernel<float, float>)(
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
