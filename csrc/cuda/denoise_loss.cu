// CUDA kernel of drep::denoise_loss_fwd: the loss (docs/method.md, L1) and its gradients
// dL/dW_d, dL/db_d (L2) in one pass over x, nothing of size M x K returned or kept.
//
// Design. x (M x K) is processed in chunks of R rows (x_noisy and p of R rows within
// kChunkBytes = 64 MiB, R a multiple of 128 and at least 128), one after the other on the current
// stream. Per chunk, five launches:
//   1. noisy_input_kernel: x_noisy = a x + s eps (L1), rounded once to the input dtype (the GEMM
//      dtype), into a chunk buffer; eps is N1's counter-based stream (csrc/philox.h), one Philox
//      call per group of four columns, or the given noise, rounded once to the GEMM dtype (the
//      precision policy) before x_noisy is formed; x and noise are read with strides.
//   2. GEMM 1 (cuBLAS, common.cuh gemm, beta = 0): p = x_noisy W_d^T, float32 result.
//   3. loss_epilogue_kernel, one block per stripe of whole rows: eps regenerated per group of
//      four (one Philox call each, rounded, as in 1), D = p + b_d - eps, |D| + D^2 summed per
//      stripe (fixed-order tree), G' = sign(D) + 2 D written over p in the GEMM dtype (in place: half
//      dtypes on the first half of each of p's rows), and its column sums per stripe (L2).
//   4. finalize_chunk_kernel: adds the chunk's stripe partials, in a fixed order and in float64,
//      to the running loss and dL/db_d sums (the first chunk starts them, the last writes the
//      results divided by M K in the result dtype: no fill before the loop, no launch after).
//   5. GEMM 2 (cuBLAS, common.cuh gemm): dL/dW_d = alpha G'^T x_noisy accumulated in float32 in
//      place: chunk 0 writes (beta = 0), later chunks add (beta = 1), alpha = 1 / (M K) (G = G' /
//      (M K), L2) times the float16 scale below. G' is read where the epilogue left it (row
//      stride 2 K for half dtypes).
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
//   loss_epilogue_kernel    p 4                      G' 2, col sums       1/4
//   finalize_chunk_kernel   col sums                 -                    -
//   GEMM 2 (beta 0, then 1) G' 2 + x_noisy 2 + C     C                    -
//
//                                     K = 768             K = 3072
//   rows per chunk R, chunks          12608, 1            3584, 4
//   stripes per chunk (rows / lane)   394 (4)             448 (1), last 232
//   launches (5 per chunk)            5                   20
//   W_d reads (2 K^2 B per chunk)     0.12 B/elem         1.95 B/elem
//   C (4 K^2 B, then 8 K^2 per chunk) 0.24 B/elem         6.82 B/elem
//   col sums (4 K B per stripe, x2)   0.25 B/elem         1.00 B/elem
//   total HBM traffic                 20.6 B/elem         29.8 B/elem
//                                     (200 MB)            (1.15 GB)
//   Philox calls                      1/2 per element (two passes of one call per four)
//   GEMM FLOPs, each of the two       14.9 GFLOP          238 GFLOP      (2 M K^2)
//   workspace (x_noisy 2 + p 4 B per chunk element, G' over p)
//                                     55.4 MiB            63.0 MiB
// (float32 input: 32 B/elem before the K x K terms instead of 20 (x, x_noisy and G' at 4 B),
// 8 B of workspace per element, so R = 2^23 / K; float64: 16 B, the same 64 MiB. A cuBLAS call
// counts as one launch. Given noise: no Philox call, its bytes read twice.) Beyond the
// workspace: the stripe partials, (K + 1) 4 B per stripe (5.5 MB at K = 3072: 448 stripes), and
// the outputs. The C term is the price of the bounded workspace: it is 8 K / R B per element for
// every chunk after the first, so it grows as K^2 for a fixed budget (R = 64 MiB / (6 K)). Past
// K of about 87000 (bf16) the 128-row floor of a chunk takes more than 64 MiB.
// Stripes: rows per lane = ceil(R / 4096) rounded up to a power of two, at most 8: R / 8
// stripes of one row per lane up to R = 4096, then about 512 (256 to 512), more above 32768
// rows. Each rows-per-lane count is its own instantiation of the epilogue (its rows unrolled).
// Compiled for sm_90 (nvcc 13.0 -Xptxas -v), registers of the epilogue for 1 / 2 / 4 / 8 rows
// per lane: 71-72 / 80 / 92 / 114 for bf16 / fp16 (three, three, two, two 256-thread blocks per
// SM), 64 / 64 / 74 / 82 for float32; sm_80 a few fewer; no spills on either. Unmeasured.
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

// Chunk workspace budget (bytes): x_noisy (input dtype) and p (float32 / float64) per element of
// the chunk, G' written over p. tests/cuda_host builds with a small one to run several chunks.
#ifndef DREP_LOSS_CHUNK_BYTES
#define DREP_LOSS_CHUNK_BYTES (int64_t(64) << 20)
#endif
constexpr int64_t kChunkBytes = DREP_LOSS_CHUNK_BYTES;
constexpr int64_t kMinChunkRows = 128;  // GEMM-friendly floor for very wide K
// The epilogue block: 32 groups of four columns (one warp: a 128-column tile) by 8 row lanes,
// each lane walking 1, 2, 4 or 8 rows of the block's stripe (a template argument: its rows are
// unrolled, and each count has its own registers), the stripe's column tiles one after the other.
constexpr int kGroupLanes = 32;
constexpr int kRowLanes = 8;
constexpr int kMaxRowsPerLane = 8;
constexpr int kTileCols = 4 * kGroupLanes;
// Stripes per chunk the epilogue aims at (rows per lane: ceil(R / (8 x 512)) rounded up to a power
// of two, at most 8): enough blocks to spread evenly over any current GPU's SMs, few enough that
// the column-sum partials (one row of K per stripe) stay small next to the chunk. tests/cuda_host
// aims at 5, so that its small chunks run every number of rows per lane, and a last chunk with
// more stripes than a full one.
#ifndef DREP_LOSS_TARGET_STRIPES
#define DREP_LOSS_TARGET_STRIPES 512
#endif
constexpr int64_t kTargetStripes = DREP_LOSS_TARGET_STRIPES;
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

// eps of row m, columns 4q .. 4q + 3 (entries past K are not eps and never read), rounded once to
// the GEMM dtype gemm_t (the precision policy: the noise the GEMMs and the loss see; nothing
// changes for float32 and float64 GEMMs), returned in acc_t. Seeded: N1's counter
// m ceil(K / 4) + q (64-bit), one Philox call for the four. Every kernel of this file draws its
// noise here, the prologue and the epilogue alike. e is indexed by constants only (its callers
// unroll), so it stays in registers.
template <typename gemm_t, typename acc_t>
__device__ __forceinline__ void noise_group(const NoiseSource& ns, int64_t m, int64_t q, acc_t e[4]) {
  if (ns.ptr == nullptr) {
    float four[4];
    philox_normal4(ns.seed, static_cast<uint64_t>(m) * static_cast<uint64_t>((ns.k + 3) / 4) + static_cast<uint64_t>(q),
                   four);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      e[j] = static_cast<acc_t>(static_cast<gemm_t>(static_cast<acc_t>(four[j])));
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t col = 4 * q + j;
    e[j] = col < ns.k ? static_cast<acc_t>(static_cast<gemm_t>(given_noise<acc_t>(ns, m, col))) : acc_t(0);
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
    noise_group<scalar_t>(ns, m, q, e);
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

// The epilogue's layout, shared with the noise test hook. Block b owns the chunk rows of stripe b,
// b h .. b h + h - 1 with h = kRowLanes rows_per_lane, whole (all K columns): thread (x, y) owns
// rows b h + y + kRowLanes i (i < rows_per_lane) and, in column tile c, the group of four columns
// c kGroupLanes + x. Whole rows per block are what lets G' overwrite p in place (the kernel).
int stripe_lanes(int64_t rows) {
  const int64_t want = (rows + kRowLanes * kTargetStripes - 1) / (kRowLanes * kTargetStripes);
  int lanes = 1;
  while (lanes < want && lanes < kMaxRowsPerLane) {
    lanes *= 2;
  }
  return lanes;
}

unsigned int stripes(int64_t rows, int rows_per_lane) {
  const int64_t h = static_cast<int64_t>(kRowLanes) * rows_per_lane;
  return static_cast<unsigned int>((rows + h - 1) / h);
}

const dim3 kEpilogueBlock(kGroupLanes, kRowLanes);

struct EpilogueThread {
  int64_t first_row;
  int rows_per_lane;

  __device__ __forceinline__ static EpilogueThread here(int rows_per_lane) {
    return {static_cast<int64_t>(blockIdx.x) * kRowLanes * rows_per_lane + threadIdx.y, rows_per_lane};
  }
  __device__ __forceinline__ int64_t row(int i) const { return first_row + kRowLanes * i; }
  // How many of the lane's rows exist: rows i below it (i < rows_per_lane, within the chunk).
  __device__ __forceinline__ int lane_rows(int64_t rows) const {
    const int64_t here = first_row < rows ? (rows - first_row + kRowLanes - 1) / kRowLanes : 0;
    return static_cast<int>(std::min<int64_t>(rows_per_lane, here));
  }
  __device__ __forceinline__ static int64_t group(int64_t tile) { return tile * kGroupLanes + threadIdx.x; }
};

// L1 / L2 epilogue over one stripe of the chunk: D = p + b_d - eps; the stripe's sum of |D| + D^2
// goes to loss_part[stripe]; with g != nullptr, G' = sign(D) + 2 D (sign(0) = 0) is written
// (through grad_to_gemm) to g[r ldg + col] and, with col_part != nullptr, the stripe's column sums
// of G' go to col_part[stripe, col]. b_d (input dtype, stride bs) may be nullptr.
// G' in place: g is p's own memory, read as gemm_t. Same dtype (float32, float64): ldg = K, each
// element read, then written, by one thread. Half dtypes: ldg = 2 K, so G' row r lies over the
// first half of p row r (its columns c .. c + 127 over p's c / 2 .. c / 2 + 63, which other
// threads of the block read): a column tile's G' is staged in shared memory and stored after
// the barrier that follows the tile's reads of p. Every p value a store covers belongs to this
// tile or an earlier one of the same rows, and the block owns its rows whole.
// All sums run in a fixed order; the per-thread arrays are indexed by unrolled constants only.
// (Two blocks per SM asked of 4 and 8 rows per lane: ptxas then keeps them in registers; left to
// its default, sm_80's 4-row half-precision build spilled 16 bytes.)
template <typename gemm_t, typename acc_t, int kRows>
__global__ void __launch_bounds__(kFinalThreads, kRows >= 4 ? 2 : 1)
    loss_epilogue_kernel(const acc_t* p, gemm_t* g, int64_t ldg, const gemm_t* bias, int64_t bs, NoiseSource ns,
                         int64_t row0, int64_t rows, int64_t k, acc_t* loss_part, acc_t* col_part) {
  constexpr bool kStaged = sizeof(gemm_t) < sizeof(acc_t);
  constexpr int kStripeRows = kRowLanes * kRows;
  ns = with_seed(ns);
  const EpilogueThread me = EpilogueThread::here(kRows);
  const int t = static_cast<int>(threadIdx.y) * kGroupLanes + static_cast<int>(threadIdx.x);
  const int64_t stripe_row0 = static_cast<int64_t>(blockIdx.x) * kStripeRows;
  __shared__ acc_t s_loss[kFinalThreads];
  __shared__ acc_t s_col[kRowLanes][kTileCols];
  __shared__ gemm_t s_g[kStaged ? kStripeRows : 1][kTileCols];
  acc_t loss = 0;
  for (int64_t tile = 0; tile * kTileCols < k; ++tile) {
    const int64_t group = EpilogueThread::group(tile);
    const int64_t col0 = 4 * group;
    acc_t col_sum[4] = {0, 0, 0, 0};
    if (col0 < k) {
      acc_t b[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        b[j] = bias != nullptr && col0 + j < k ? static_cast<acc_t>(bias[(col0 + j) * bs]) : acc_t(0);
      }
      // The lane's rows, walked by increments from its first: nothing per row is invariant over
      // the tile loop for the compiler to keep in registers across it (8 rows of 64-bit
      // addresses and counters, which cost 40 registers in an indexed form).
      const int n_here = me.lane_rows(rows);
      int64_t pi = me.first_row * k + col0;
      int64_t gi = me.first_row * ldg + col0;
      int64_t m = row0 + me.first_row;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (i < n_here) {
          acc_t e[4];
          noise_group<gemm_t>(ns, m, group, e);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (col0 + j < k) {
              const acc_t d = p[pi + j] + b[j] - e[j];
              loss += (d < acc_t(0) ? -d : d) + d * d;
              const acc_t grad = (d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0))) + acc_t(2) * d;
              col_sum[j] += grad;
              if (g != nullptr) {
                if constexpr (kStaged) {
                  s_g[threadIdx.y + kRowLanes * i][4 * threadIdx.x + j] = grad_to_gemm<gemm_t>(grad);
                } else {
                  g[gi + j] = grad_to_gemm<gemm_t>(grad);
                }
              }
            }
          }
        }
        pi += kRowLanes * k;
        gi += kRowLanes * ldg;
        m += kRowLanes;
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s_col[threadIdx.y][4 * threadIdx.x + j] = col_sum[j];
    }
    __syncthreads();  // the tile's p is read (G' may cover it); s_g and s_col are complete
    if constexpr (kStaged) {
      if (g != nullptr) {  // the staged tile, 128 contiguous columns per row
        for (int e = t; e < kStripeRows * kTileCols; e += kFinalThreads) {
          const int row = e / kTileCols, c = e % kTileCols;
          const int64_t r = stripe_row0 + row, col = tile * kTileCols + c;
          if (r < rows && col < k) {
            g[r * ldg + col] = s_g[row][c];
          }
        }
      }
    }
    // One thread per column of the tile adds its row lanes in order.
    const int64_t col = tile * kTileCols + t;
    if (col_part != nullptr && t < kTileCols && col < k) {
      acc_t c = 0;
#pragma unroll
      for (int lane = 0; lane < kRowLanes; ++lane) {
        c += s_col[lane][t];
      }
      col_part[static_cast<int64_t>(blockIdx.x) * k + col] = c;
    }
    __syncthreads();  // s_g and s_col are read before the next tile writes them
  }
  s_loss[t] = loss;
  cuda::block_tree_sum<kFinalThreads>(s_loss, t);
  if (t == 0) {
    loss_part[blockIdx.x] = s_loss[0];
  }
}

// Adds one chunk's partials to the running sums, in float64 and in a fixed order. Block b does
// columns 32 b .. 32 b + 31 of col_part into grad_bias_sum: thread (x, y) adds the stripes y,
// y + 8, ... of column 32 b + x in order, then row lane 0 adds the 8 lane sums in order (32
// columns per warp: each warp reads 128 contiguous bytes per stripe). Block 0 also reduces
// loss_part (strided per thread, then a fixed tree) into loss_sum[0]. The first chunk starts the
// sums (no fill launch before the loop); the last writes the results, loss_sum / n and
// grad_bias_sum / n in acc_t (no division or cast launch after it). One chunk: both.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    finalize_chunk_kernel(const acc_t* loss_part, int64_t n_loss, double* loss_sum, const acc_t* col_part,
                          int64_t n_stripes, int64_t k, double* grad_bias_sum, bool first, bool last, double n,
                          acc_t* loss_out, acc_t* grad_bias_out) {
  const int t = static_cast<int>(threadIdx.y) * kGroupLanes + static_cast<int>(threadIdx.x);
  __shared__ double s[kFinalThreads];
  if (col_part != nullptr) {  // uniform per launch: every thread reaches the barrier
    const int64_t col = static_cast<int64_t>(blockIdx.x) * kGroupLanes + threadIdx.x;
    double c = 0;
    if (col < k) {
      for (int64_t stripe = threadIdx.y; stripe < n_stripes; stripe += kRowLanes) {
        c += static_cast<double>(col_part[stripe * k + col]);
      }
    }
    s[t] = c;
    __syncthreads();
    if (threadIdx.y == 0 && col < k) {
      double total = first ? 0.0 : grad_bias_sum[col];
#pragma unroll
      for (int lane = 0; lane < kRowLanes; ++lane) {
        total += s[lane * kGroupLanes + threadIdx.x];
      }
      if (last) {
        grad_bias_out[col] = static_cast<acc_t>(total / n);
      } else {
        grad_bias_sum[col] = total;
      }
    }
  }
  if (blockIdx.x == 0) {  // uniform per block: the barriers below are reached by all its threads
    double v = 0;
    for (int64_t i = t; i < n_loss; i += kFinalThreads) {
      v += static_cast<double>(loss_part[i]);
    }
    __syncthreads();  // s is free again (the column sums above have read it)
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

// Rows per chunk: the workspace budget over x_noisy's and p's bytes per element (6 for bf16 /
// fp16, 8 for float32, 16 for float64), a multiple of 128 (at least 128), never more than M.
int64_t chunk_rows(int64_t m, int64_t k, int64_t bytes_per_element) {
  const int64_t r = kChunkBytes / bytes_per_element / k / kMinChunkRows * kMinChunkRows;
  return std::min<int64_t>(std::max<int64_t>(r, kMinChunkRows), m);
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

  const int64_t rows_max = chunk_rows(m, k, sizeof(scalar_t) + sizeof(acc_t));
  // Stripes of a full chunk and of the last, partial one (it may have more: fewer rows per lane).
  const auto chunk_stripes = [](int64_t rows) { return static_cast<int64_t>(stripes(rows, stripe_lanes(rows))); };
  const int64_t stripes_max = std::max(chunk_stripes(rows_max), m % rows_max ? chunk_stripes(m % rows_max) : 0);
  at::Tensor x_noisy = at::empty({rows_max, k}, x.options());
  at::Tensor p = at::empty({rows_max, k}, opts);
  // G' in place over p (loss_epilogue_kernel): p itself (same dtype), or the first half of each of
  // p's rows read as the input dtype (row stride 2 K).
  at::Tensor g;
  if (compute_grad) {
    g = std::is_same_v<scalar_t, acc_t> ? p : p.view(x.scalar_type()).narrow(1, 0, k);
  }
  at::Tensor loss_part = at::empty({stripes_max}, opts);
  at::Tensor col_part = bias_grad ? at::empty({stripes_max, k}, opts) : at::Tensor();
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

    const int lanes = stripe_lanes(rows);
    const unsigned int n_stripes = stripes(rows, lanes);
    const auto epilogue = [&](auto kernel) {
      DREP_LAUNCH(n_stripes, kEpilogueBlock, 0, stream, kernel)(
          p_c.const_data_ptr<acc_t>(), compute_grad ? g.mutable_data_ptr<scalar_t>() : nullptr,
          compute_grad ? g.stride(0) : 0, has_bias ? denoise_bias->const_data_ptr<scalar_t>() : nullptr,
          has_bias ? denoise_bias->stride(0) : 0, ns, row0, rows, k, loss_part.mutable_data_ptr<acc_t>(),
          bias_grad ? col_part.mutable_data_ptr<acc_t>() : nullptr);
    };
    switch (lanes) {
      case 1:
        epilogue(loss_epilogue_kernel<scalar_t, acc_t, 1>);
        break;
      case 2:
        epilogue(loss_epilogue_kernel<scalar_t, acc_t, 2>);
        break;
      case 4:
        epilogue(loss_epilogue_kernel<scalar_t, acc_t, 4>);
        break;
      default:
        static_assert(kMaxRowsPerLane == 8, "stripe_lanes picks 1, 2, 4 or 8 rows per lane");
        epilogue(loss_epilogue_kernel<scalar_t, acc_t, 8>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Blocks for dL/db_d's columns, 32 each; without it block 0 alone (the loss).
    const auto final_blocks = bias_grad ? static_cast<unsigned int>((k + kGroupLanes - 1) / kGroupLanes) : 1u;
    DREP_LAUNCH(final_blocks, kEpilogueBlock, 0, stream, finalize_chunk_kernel<acc_t>)(
        loss_part.const_data_ptr<acc_t>(), n_stripes, loss_sum.mutable_data_ptr<double>(),
        bias_grad ? col_part.const_data_ptr<acc_t>() : nullptr, n_stripes, k,
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
    epilogue_noise_kernel(NoiseSource ns, int64_t row0, int64_t rows, int rows_per_lane, float* out) {
  ns = with_seed(ns);
  const EpilogueThread me = EpilogueThread::here(rows_per_lane);
  for (int64_t tile = 0; tile * kTileCols < ns.k; ++tile) {
    const int64_t group = EpilogueThread::group(tile);
    const int64_t col0 = 4 * group;
    if (col0 >= ns.k) {
      continue;
    }
    const int n_here = me.lane_rows(rows);
#pragma unroll
    for (int i = 0; i < kMaxRowsPerLane; ++i) {
      if (i < n_here) {
        const int64_t r = me.row(i);
        float e[4];
        noise_group<float>(ns, row0 + r, group, e);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (col0 + j < ns.k) {
            out[r * ns.k + col0 + j] = e[j];
          }
        }
      }
    }
  }
}

// drep::_denoise_noise (test hook, csrc/ops.cpp): eps rows as this file's kernels draw them (in
// float32, before any GEMM dtype's rounding): the prologue's (noisy_input_kernel with x = 0,
// a = 0, s = 1), or with per_element the loss epilogue's (epilogue_noise_kernel). The name
// per_element is the op schema's, from when the epilogue drew one element per Philox call; it
// now draws groups of four in its own layout.
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
    const int lanes = stripe_lanes(rows);
    DREP_LAUNCH(stripes(rows, lanes), kEpilogueBlock, 0, stream, epilogue_noise_kernel)(
        ns, row0, rows, lanes, out.mutable_data_ptr<float>());
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
