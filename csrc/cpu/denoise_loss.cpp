// CPU kernel of drep::denoise_loss_fwd: the denoising loss (docs/method.md, L1) and its
// gradients dL/dW_d, dL/db_d (L2), with the noise regenerated from its counter (N1).
//
// Shape of the computation. The M rows are cut into tiles, a tile into chunks (sizes in
// make_plan: they depend on M and K only). Two kinds of work item:
//   pass 1, one chunk: x_noisy = a x + s eps into the tile buffer (eps regenerated from
//     (seed, m, k), or read from `noise`), p = x_noisy W_d^T (one BLAS GEMM of the chunk
//     against all of W_d), then in one sweep over p: D = p + b_d - eps, partial sums of |D|
//     and D^2, G = (sign D + 2 D) / (M K) written over p;
//   pass 2 (only when compute_grad), one block of rows of dL/dW_d over a whole tile:
//     dL/dW_d[blk] += G[:, blk]^T x_noisy (one BLAS GEMM), dL/db_d[blk] += column sums of G
//     (summed per chunk in pass 1's sweep).
// Step t runs pass 1 of tile t and pass 2 of tile t - 1 as one pool of items (double-buffered
// tiles), so the threads share both GEMMs' work with one barrier per tile.
//
// Work per element of x, counted for issue #14 (the same before and after it; what changed is
// the noise's vector width):
// - noise, drawn once (noise.h): 1/4 Philox4x32-10 call (one counter gives four normals), so 5
//   32 x 32 -> 64-bit multiplies; 1/2 log, 1/2 sqrt and 1/2 sin-and-cos (Box-Muller pairs);
// - passes over the chunk's rows: x gathered into the tile buffer; eps written once into the
//   thread's chunk buffer (drawn a few rows at a time, so that the noising reads it from L1/L2
//   right after), then read twice, by the noising (x_noisy = a x + s eps, in place) and by the
//   epilogue (D = p + b_d - eps: no second draw); the epilogue reads p and writes G over it;
//   then the two GEMMs read x_noisy, and G with x_noisy.
// Measured alone (AMD Zen 4 with AVX-512, 1 thread, K = 384, ns per element): noise 9.1 on
// the baseline path, 1.50 on AVX2, 0.90 on AVX-512; gather 0.08, noising 0.08, epilogue
// 0.20. So the noise is the elementwise cost that matters, and only it has an AVX-512 path.
//
// Nothing of size M x K exists; the temporary memory is bounded by the tile sizes (see
// denoise_loss_cpu_impl). W_d and b_d are cast once to the compute dtype (K x K + K). x and
// noise may have any strides and any floating dtype: their rows are gathered and converted
// straight into the tile buffers, no copy of them is made.
//
// Determinism (bitwise, run to run and for any torch.get_num_threads()):
// - tile, chunk and block boundaries depend on M and K only, never on the thread count;
// - every work item (a chunk, a block) runs whole on one thread; which thread does not matter;
// - partial sums are combined in a fixed order: 8 lanes and chunk column sums in the compute
//   dtype, then rows, chunks and tiles in float64; no floating-point atomics (the only atomic
//   is the integer work counter);
// - every BLAS call runs on one thread: items set MKL's per-thread count to 1 (OneBlasThread;
//   torch turns MKL_DYNAMIC off, and MKL's AVX-512 GEMMs, which it runs on Intel CPUs, then
//   split a reduction by the global thread count even inside our parallel region), and
//   OpenBLAS is single-threaded inside an OpenMP region. A threaded GEMM may split its
//   reduction by thread count; a single-threaded one on the same shapes and alignments does
//   not. Tested on MKL's default, AVX2 and AVX-512 paths (tests/test_cpu_kernels.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "isa.h"
#include "noise.h"
#include "workspace.h"

#ifdef DREP_HAVE_X86_PATHS
#include <immintrin.h>
#endif

namespace drep {
namespace {

// How the rows and dL/dW_d are cut into work items. Everything here depends on (M, K) only
// (never on the thread count), so the order of every floating-point sum is fixed.
struct Plan {
  int64_t tile_rows;   // rows per tile = reduction length of one gradient GEMM call (the
                       // last tile may be shorter)
  int64_t chunk_rows;  // rows per pass-1 item = rows of one forward GEMM call
  int64_t block_rows;  // rows of dL/dW_d per pass-2 item
  int64_t n_blocks;
};

Plan make_plan(int64_t M, int64_t K) {
  Plan p;
  // Long forward chunks: each call re-packs all of W_d (K x K) for BLAS, and MKL's GEMMs run
  // slower on short ones. Measured (M = 1576, 1 thread, MKL's AVX-512 path, forward GEMM in
  // chunks against one call): 394-row chunks 1.02x at K = 768 and 1.08x at K = 1536, 788-row
  // chunks 1.00x and 1.035x; 197-row chunks 1.06x at K = 384.
  const int64_t chunk_target = 800;
  // Tiles of at most about 2^20 elements (4 MiB in float32) up to K = 655, of 2 chunks (1600
  // rows) above it: a long reduction for the gradient GEMM, and several chunks per tile to
  // share among threads. (Gradient GEMM in 788-row tiles against one 1576-row call: 1.08x at
  // K = 768, 1.03x at K = 1536.)
  const int64_t chunks_target = (int64_t{1} << 20) / (chunk_target * std::max<int64_t>(K, 1));
  const int64_t tile_target = chunk_target * std::clamp<int64_t>(chunks_target, 2, 16);
  // M is cut into tiles of equal size, and a tile into an even number of equal chunks: the
  // items of a step are then alike in cost and pair up on 2 (4, ...) threads. (Cut at the
  // target sizes instead, M = 1576 at K = 768 left a step with a 512-row and a 40-row chunk
  // and took 1.3x its balanced time on 2 threads.)
  const int64_t n_tiles = std::max<int64_t>(1, (M + tile_target - 1) / tile_target);
  p.tile_rows = std::max<int64_t>(1, (M + n_tiles - 1) / n_tiles);
  int64_t chunks = std::max<int64_t>(2, (p.tile_rows + chunk_target - 1) / chunk_target);
  chunks += chunks % 2;
  p.chunk_rows = std::max<int64_t>(1, (p.tile_rows + chunks - 1) / chunks);
  // Gradient blocks of at most 768 rows (smaller ones lose GEMM rate: x_noisy is re-packed
  // per call; 384-row blocks took 1.02x the time of 768-row ones at K = 1536 and 3072), and
  // at least 2 once K >= 256 so that the last step has 2 items.
  p.n_blocks = std::max<int64_t>(K >= 256 ? 2 : 1, (K + 767) / 768);
  p.block_rows = (K + p.n_blocks - 1) / p.n_blocks;
  p.n_blocks = (K + p.block_rows - 1) / p.block_rows;
  return p;
}

// Independent partial sums per row in the epilogue (fixed, so vectorisable and deterministic).
constexpr int kLanes = 8;

// ---------------------------------------------------------------------------------------
// Strided rows of any floating dtype, converted into a contiguous compute-dtype row.

template <typename scalar_t>
using RowLoader = void (*)(const char* row, int64_t stride, int64_t n, scalar_t* out);

template <typename src_t, typename scalar_t>
void load_row(const char* row, int64_t stride, int64_t n, scalar_t* out) {
  const src_t* p = reinterpret_cast<const src_t*>(row);
  if (stride == 1) {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<scalar_t>(p[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<scalar_t>(p[k * stride]);
  }
}

template <typename scalar_t>
RowLoader<scalar_t> row_loader(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return &load_row<float, scalar_t>;
    case at::kDouble: return &load_row<double, scalar_t>;
    case at::kHalf: return &load_row<at::Half, scalar_t>;
    case at::kBFloat16: return &load_row<at::BFloat16, scalar_t>;
    default: TORCH_CHECK(false, "denoise_loss_fwd: unsupported dtype ", t);
  }
}

// ---------------------------------------------------------------------------------------
// Work distribution.

}  // namespace
}  // namespace drep

// MKL's per-thread thread count, C interface (mkl_service.h maps mkl_set_num_threads_local to
// it; the lowercase symbol is the Fortran one, taking a pointer). Exported by torch's MKL
// builds; weak: null where torch has no MKL.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace drep {
namespace {

// Runs every BLAS call of the current thread's items on one thread, restoring the previous
// setting on exit. Without it, torch's MKL (which disables MKL_DYNAMIC) threads a GEMM called
// inside our parallel region on its AVX-512 path, so dL/dW_d's reduction order, and its last
// bits, changed with torch.get_num_threads() on Intel CPUs (up to 1.5e-9 at M = 3500, K = 300).
// OpenBLAS needs nothing: inside an OpenMP region it runs single-threaded.
struct OneBlasThread {
  int previous = 0;
  OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;
};

// Runs item(i) for every i in [0, n) on torch's intra-op threads, each item whole on one
// thread, items taken from a shared counter (a core lost to another process delays only the
// items it would have taken). At least two slots are opened when torch has two or more
// threads, so items always run inside an active parallel region, where BLAS is single-
// threaded; with one thread the region is inline and BLAS has one thread anyway.
// item(i, thread) also gets its thread's index in [0, at::get_num_threads()), for scratch.
// The caller's thread-local state (autograd mode, dispatch keys) is carried into the worker
// threads, so the ATen calls inside items dispatch as they would on the calling thread.
template <typename F>
void run_items(int64_t n, const F& item) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t slots = std::max<int64_t>(2, std::min<int64_t>(n, at::get_num_threads()));
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, slots, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const OneBlasThread one_blas_thread;
    const int thread = at::get_thread_num();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) item(i, thread);
  });
}

// ---------------------------------------------------------------------------------------
// Elementwise row passes. Each body is written once and compiled twice: for the baseline ISA
// and, on x86-64, for AVX2 + FMA, which the AVX2 and AVX-512 paths of cpu_path() both run:
// together 0.3 ns per element (header comment), too little for 16 lanes to show.

// L1 noising in place over the row holding x: x_noisy = a x + s eps.
template <typename scalar_t>
C10_ALWAYS_INLINE void noising_body(scalar_t* __restrict__ xr, const scalar_t* __restrict__ er, int64_t n, scalar_t a,
                                    scalar_t s) {
  for (int64_t k = 0; k < n; ++k) xr[k] = a * xr[k] + s * er[k];
}

// L1 epilogue for one row, in place: p <- G = (sign D + 2 D) / (M K) (L2) with
// D = p + b - eps; sums of |D| and D^2 added to the row totals; with kColSum, G added to the
// chunk's column sums (for dL/db_d). kLanes independent partial sums in the compute dtype,
// reduced in a fixed order into float64.
template <typename scalar_t, bool kGrad, bool kColSum>
C10_ALWAYS_INLINE void epilogue_element(scalar_t* __restrict__ p, const scalar_t* __restrict__ eps,
                                        const scalar_t* __restrict__ bias, int64_t k, scalar_t inv_mk,
                                        scalar_t* __restrict__ col_sum, scalar_t& acc_abs, scalar_t& acc_sq) {
  const scalar_t d = p[k] + bias[k] - eps[k];
  acc_abs += std::abs(d);
  acc_sq += d * d;
  if constexpr (kGrad) {
    const scalar_t sign = (d > 0 ? scalar_t(1) : scalar_t(0)) - (d < 0 ? scalar_t(1) : scalar_t(0));
    const scalar_t g = (sign + 2 * d) * inv_mk;
    p[k] = g;
    if constexpr (kColSum) col_sum[k] += g;
  }
}

template <typename scalar_t, bool kGrad, bool kColSum>
C10_ALWAYS_INLINE void epilogue_body(scalar_t* __restrict__ p, const scalar_t* __restrict__ eps,
                                     const scalar_t* __restrict__ bias, int64_t n, scalar_t inv_mk,
                                     scalar_t* __restrict__ col_sum, double* abs_sum, double* sq_sum) {
  scalar_t acc_abs[kLanes] = {}, acc_sq[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      epilogue_element<scalar_t, kGrad, kColSum>(p, eps, bias, k + l, inv_mk, col_sum, acc_abs[l], acc_sq[l]);
    }
  }
  for (int l = 0; k < n; ++k, ++l) {
    epilogue_element<scalar_t, kGrad, kColSum>(p, eps, bias, k, inv_mk, col_sum, acc_abs[l], acc_sq[l]);
  }
  double row_abs = 0, row_sq = 0;
  for (int l = 0; l < kLanes; ++l) {
    row_abs += acc_abs[l];
    row_sq += acc_sq[l];
  }
  *abs_sum += row_abs;
  *sq_sum += row_sq;
}

#ifdef DREP_HAVE_X86_PATHS
// The float32 epilogue_body in AVX2 intrinsics (the compiler does not vectorise the generic
// one well): lane l of the accumulators holds the elements k = l mod 8, as there.
template <bool kGrad, bool kColSum>
__attribute__((target("avx2,fma"))) void epilogue_f32_avx2(float* __restrict__ p, const float* __restrict__ eps,
                                                           const float* __restrict__ bias, int64_t n, float inv_mk,
                                                           float* __restrict__ col_sum, double* abs_sum,
                                                           double* sq_sum) {
  const __m256 zero = _mm256_setzero_ps(), minus_zero = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  const __m256 two = _mm256_set1_ps(2.0f), inv = _mm256_set1_ps(inv_mk);
  __m256 acc_abs = zero, acc_sq = zero;
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_add_ps(_mm256_loadu_ps(p + k), _mm256_loadu_ps(bias + k)),
                                   _mm256_loadu_ps(eps + k));
    acc_abs = _mm256_add_ps(acc_abs, _mm256_andnot_ps(minus_zero, d));
    acc_sq = _mm256_fmadd_ps(d, d, acc_sq);
    if constexpr (kGrad) {
      // sign(d): 1 carrying d's sign bit, masked to 0 where d == 0.
      const __m256 sign = _mm256_and_ps(_mm256_or_ps(_mm256_and_ps(d, minus_zero), one),
                                        _mm256_cmp_ps(d, zero, _CMP_NEQ_OQ));
      const __m256 g = _mm256_mul_ps(_mm256_fmadd_ps(two, d, sign), inv);
      _mm256_storeu_ps(p + k, g);
      if constexpr (kColSum) _mm256_storeu_ps(col_sum + k, _mm256_add_ps(_mm256_loadu_ps(col_sum + k), g));
    }
  }
  alignas(32) float lanes_abs[8], lanes_sq[8];
  _mm256_store_ps(lanes_abs, acc_abs);
  _mm256_store_ps(lanes_sq, acc_sq);
  for (int l = 0; k < n; ++k, ++l) {
    epilogue_element<float, kGrad, kColSum>(p, eps, bias, k, inv_mk, col_sum, lanes_abs[l], lanes_sq[l]);
  }
  double row_abs = 0, row_sq = 0;
  for (int l = 0; l < 8; ++l) {
    row_abs += lanes_abs[l];
    row_sq += lanes_sq[l];
  }
  *abs_sum += row_abs;
  *sq_sum += row_sq;
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void noising_avx2(scalar_t* xr, const scalar_t* er, int64_t n, scalar_t a,
                                                      scalar_t s) {
  noising_body(xr, er, n, a, s);
}
template <typename scalar_t, bool kGrad, bool kColSum>
__attribute__((target("avx2,fma"))) void epilogue_avx2(scalar_t* p, const scalar_t* eps, const scalar_t* bias,
                                                       int64_t n, scalar_t inv_mk, scalar_t* col_sum,
                                                       double* abs_sum, double* sq_sum) {
  epilogue_body<scalar_t, kGrad, kColSum>(p, eps, bias, n, inv_mk, col_sum, abs_sum, sq_sum);
}
#endif

template <typename scalar_t>
void noising_row(scalar_t* xr, const scalar_t* er, int64_t n, scalar_t a, scalar_t s) {
#ifdef DREP_HAVE_X86_PATHS
  if (cpu_path() != CpuPath::kBaseline) return noising_avx2(xr, er, n, a, s);
#endif
  noising_body(xr, er, n, a, s);
}

template <typename scalar_t, bool kGrad, bool kColSum>
void epilogue_row(scalar_t* p, const scalar_t* eps, const scalar_t* bias, int64_t n, scalar_t inv_mk,
                  scalar_t* col_sum, double* abs_sum, double* sq_sum) {
#ifdef DREP_HAVE_X86_PATHS
  if (cpu_path() != CpuPath::kBaseline) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return epilogue_f32_avx2<kGrad, kColSum>(p, eps, bias, n, inv_mk, col_sum, abs_sum, sq_sum);
    } else {
      return epilogue_avx2<scalar_t, kGrad, kColSum>(p, eps, bias, n, inv_mk, col_sum, abs_sum, sq_sum);
    }
  }
#endif
  epilogue_body<scalar_t, kGrad, kColSum>(p, eps, bias, n, inv_mk, col_sum, abs_sum, sq_sum);
}

template <typename scalar_t>
void denoise_loss_cpu_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double a,
                           double s, const std::optional<at::Tensor>& noise, uint64_t seed, bool compute_grad,
                           at::Tensor& loss, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t M = x.size(0), K = x.size(1);
  const Plan plan = make_plan(M, K);
  const bool has_bias = grad_bias.numel() > 0;
  const scalar_t a_c = static_cast<scalar_t>(a), s_c = static_cast<scalar_t>(s);
  const scalar_t inv_mk = static_cast<scalar_t>(1.0 / (static_cast<double>(M) * static_cast<double>(K)));

  const at::Tensor w_t = weight.t();  // p = x_noisy W_d^T: BLAS reads W_d transposed in place
  const scalar_t* b_ptr = bias.const_data_ptr<scalar_t>();

  const RowLoader<scalar_t> load_x = row_loader<scalar_t>(x.scalar_type());
  const char* x_base = static_cast<const char*>(x.const_data_ptr());
  const int64_t x_row = x.stride(0) * x.element_size(), x_col = x.stride(1);
  RowLoader<scalar_t> load_noise = nullptr;
  const char* n_base = nullptr;
  int64_t n_row = 0, n_col = 0;
  if (noise.has_value()) {
    load_noise = row_loader<scalar_t>(noise->scalar_type());
    n_base = static_cast<const char*>(noise->const_data_ptr());
    n_row = noise->stride(0) * noise->element_size();
    n_col = noise->stride(1);
  }

  // Temporary memory, bounded whatever M: two sets (double buffering, see below) of two
  // tile buffers, x_noisy and p/G, plus one eps buffer of a chunk per thread:
  // (4 tile_rows + threads chunk_rows) K compute-dtype elements, at most
  // 4 max(2^20, 1600 K) + threads 800 K (make_plan). In float32: up to K = 655 at most
  // 16 MiB + 2 MiB per thread; above it (25 MiB + 3.1 MiB per thread) per 1024 of K
  // (K = 3072: 75 MiB + 9.4 MiB per thread); twice that in float64; plus O(K) and
  // O(K tile_rows / chunk_rows) scalars, and workspace.h's rounding up to 2 MiB.
  // All of it is carved from the calling thread's workspace (workspace.h), which is kept
  // between calls: fresh pages cost a page fault each (measured in workspace.h).
  const int64_t tile_rows = std::min(M, plan.tile_rows);
  const int64_t n_sets = compute_grad ? 2 : 1;
  const int64_t n_threads = at::get_num_threads();
  const int64_t n_tiles = (M + plan.tile_rows - 1) / plan.tile_rows;
  const int64_t max_chunks = (tile_rows + plan.chunk_rows - 1) / plan.chunk_rows;
  const bool widen_noise = !std::is_same_v<scalar_t, float> && load_noise == nullptr;
  const int64_t buf_elems[] = {
      n_sets * tile_rows * K,                           // x_noisy tiles
      n_sets * tile_rows * K,                           // p, then G in place
      n_threads * std::min(M, plan.chunk_rows) * K,     // eps of a chunk, per thread
      (has_bias ? n_sets : 0) * max_chunks * K,         // column sums of G per chunk (dL/db_d)
  };
  constexpr size_t kAlign = 64;  // every buffer starts on a cache line
  const auto padded = [](size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; };
  size_t total_bytes = padded(static_cast<size_t>(widen_noise ? n_threads * K : 0) * sizeof(float));
  for (const int64_t n : buf_elems) total_bytes += padded(static_cast<size_t>(n) * sizeof(scalar_t));
  char* next_buf = static_cast<char*>(cpu_workspace(total_bytes));
  const auto carve = [&](size_t bytes) {
    char* p = next_buf;
    next_buf += padded(bytes);
    return p;
  };
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const at::Tensor xn_buf = at::from_blob(carve(buf_elems[0] * sizeof(scalar_t)), {n_sets, tile_rows, K}, opts);
  const at::Tensor pg_buf = at::from_blob(carve(buf_elems[1] * sizeof(scalar_t)), {n_sets, tile_rows, K}, opts);
  scalar_t* const eps_buf = reinterpret_cast<scalar_t*>(carve(buf_elems[2] * sizeof(scalar_t)));
  scalar_t* const colsum_buf = reinterpret_cast<scalar_t*>(carve(buf_elems[3] * sizeof(scalar_t)));
  // float noise before widening, float64 only
  float* const eps_f32 = widen_noise ? reinterpret_cast<float*>(carve(n_threads * K * sizeof(float))) : nullptr;
  const int64_t eps_stride = std::min(M, plan.chunk_rows) * K;

  std::vector<double> chunk_abs(max_chunks), chunk_sq(max_chunks);
  std::vector<double> bias_acc(has_bias ? K : 0, 0.0);
  double total_abs = 0, total_sq = 0;

  // Pass 1 on chunk c of tile t: N1 noise and L1 noising into the tile buffer, the forward
  // GEMM p = x_noisy W_d^T, then the epilogue (L1 partial sums, L2's G over p).
  const auto pass1 = [&](int64_t t, int64_t c, int thread) {
    const int64_t t0 = t * plan.tile_rows, rows = std::min(plan.tile_rows, M - t0);
    const int64_t r0 = c * plan.chunk_rows, nr = std::min(plan.chunk_rows, rows - r0);
    at::Tensor xn_tile = xn_buf[t % n_sets], pg_tile = pg_buf[t % n_sets];
    scalar_t* xn = xn_tile.data_ptr<scalar_t>() + r0 * K;
    scalar_t* pg = pg_tile.data_ptr<scalar_t>() + r0 * K;
    TORCH_INTERNAL_ASSERT(thread < n_threads);
    scalar_t* eps = eps_buf + thread * eps_stride;
    // float32 noise is drawn a group of rows at a time (about 32 KiB: it is still in cache for
    // the noising), one span of counters when 4 divides K (noise.h), so short rows share vector
    // blocks.
    const int64_t noise_group = std::max<int64_t>(1, 8192 / K);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t m = t0 + r0 + r;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (load_noise == nullptr && r % noise_group == 0) {
          noise_rows(seed, static_cast<uint64_t>(m), std::min(noise_group, nr - r), K, eps + r * K);
        }
      }
      scalar_t* xr = xn + r * K;
      scalar_t* er = eps + r * K;
      load_x(x_base + m * x_row, x_col, K, xr);
      if (load_noise != nullptr) {
        load_noise(n_base + m * n_row, n_col, K, er);
      } else if constexpr (!std::is_same_v<scalar_t, float>) {
        float* ef = eps_f32 + thread * K;
        noise_row(seed, static_cast<uint64_t>(m), K, ef);
        for (int64_t k = 0; k < K; ++k) er[k] = static_cast<scalar_t>(ef[k]);
      }
      noising_row(xr, er, K, a_c, s_c);
    }
    at::Tensor p_rows = pg_tile.narrow(0, r0, nr);
    at::mm_out(p_rows, xn_tile.narrow(0, r0, nr), w_t);
    double sum_abs = 0, sum_sq = 0;
    scalar_t* col_sum = nullptr;
    if (has_bias) {
      col_sum = colsum_buf + ((t % n_sets) * max_chunks + c) * K;
      std::fill(col_sum, col_sum + K, scalar_t(0));
    }
    for (int64_t r = 0; r < nr; ++r) {
      scalar_t* pr = pg + r * K;
      const scalar_t* er = eps + r * K;
      if (has_bias) {
        epilogue_row<scalar_t, true, true>(pr, er, b_ptr, K, inv_mk, col_sum, &sum_abs, &sum_sq);
      } else if (compute_grad) {
        epilogue_row<scalar_t, true, false>(pr, er, b_ptr, K, inv_mk, nullptr, &sum_abs, &sum_sq);
      } else {
        epilogue_row<scalar_t, false, false>(pr, er, b_ptr, K, inv_mk, nullptr, &sum_abs, &sum_sq);
      }
    }
    chunk_abs[c] = sum_abs;
    chunk_sq[c] = sum_sq;
  };

  // Pass 2 (L2) on block blk of tile t: dL/dW_d[blk] += G[:, blk]^T x_noisy and
  // dL/db_d[blk] += column sums of G[:, blk] (made per chunk in pass 1); a block accumulates
  // over the tiles in order.
  const auto pass2 = [&](int64_t t, int64_t blk) {
    const int64_t t0 = t * plan.tile_rows, rows = std::min(plan.tile_rows, M - t0);
    const int64_t j0 = blk * plan.block_rows, nj = std::min(plan.block_rows, K - j0);
    const at::Tensor g_tile = pg_buf[t % n_sets].narrow(0, 0, rows);
    at::Tensor gw_rows = grad_weight.narrow(0, j0, nj);
    gw_rows.addmm_(g_tile.narrow(1, j0, nj).t(), xn_buf[t % n_sets].narrow(0, 0, rows));
    if (has_bias) {
      const int64_t n_chunks = (rows + plan.chunk_rows - 1) / plan.chunk_rows;
      const scalar_t* sums = colsum_buf + (t % n_sets) * max_chunks * K + j0;
      double* acc = bias_acc.data() + j0;
      for (int64_t c = 0; c < n_chunks; ++c) {
        for (int64_t j = 0; j < nj; ++j) acc[j] += static_cast<double>(sums[c * K + j]);
      }
    }
  };

  // Step t runs pass 1 of tile t together with pass 2 of tile t - 1 (they use different
  // buffer sets), so one pool of items keeps every thread busy and there is one barrier
  // per tile. Items are taken largest kind first.
  const double pass1_cost = static_cast<double>(plan.chunk_rows) * K;
  const double pass2_cost = static_cast<double>(plan.block_rows) * std::min(M, plan.tile_rows);
  const bool pass2_first = pass2_cost > pass1_cost;
  for (int64_t t = 0; t <= n_tiles; ++t) {
    const int64_t n1 = t < n_tiles ? (std::min(plan.tile_rows, M - t * plan.tile_rows) + plan.chunk_rows - 1) /
                                         plan.chunk_rows
                                   : 0;
    const int64_t n2 = compute_grad && t > 0 ? plan.n_blocks : 0;
    run_items(n1 + n2, [&](int64_t i, int thread) {
      const bool is_pass2 = pass2_first ? i < n2 : i >= n1;
      if (is_pass2) {
        pass2(t - 1, pass2_first ? i : i - n1);
      } else {
        pass1(t, pass2_first ? i - n2 : i, thread);
      }
    });
    for (int64_t c = 0; c < n1; ++c) {
      total_abs += chunk_abs[c];
      total_sq += chunk_sq[c];
    }
  }

  loss.fill_((total_abs + total_sq) / (static_cast<double>(M) * static_cast<double>(K)));
  if (has_bias) {
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    for (int64_t j = 0; j < K; ++j) gb[j] = static_cast<scalar_t>(bias_acc[j]);
  }
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> denoise_loss_fwd_cpu(
    const at::Tensor& x, const at::Tensor& denoise_weight, const std::optional<at::Tensor>& denoise_bias, double a,
    double s, const std::optional<at::Tensor>& noise, const at::Tensor& seed, bool compute_grad) {
  TORCH_CHECK(x.dim() == 2, "denoise_loss_fwd: x must be 2-D (M, K), got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(denoise_weight.sizes() == at::IntArrayRef({K, K}), "denoise_loss_fwd: denoise_weight must be (", K,
              ", ", K, "), got ", denoise_weight.sizes());
  TORCH_CHECK(!denoise_bias.has_value() || denoise_bias->sizes() == at::IntArrayRef({K}),
              "denoise_loss_fwd: denoise_bias must be (", K, ",)");
  TORCH_CHECK(!noise.has_value() || noise->sizes() == x.sizes(), "denoise_loss_fwd: noise must be (", M, ", ", K,
              "), got ", noise.has_value() ? noise->sizes() : at::IntArrayRef{});
  TORCH_CHECK(is_float_dtype(x.scalar_type()) && is_float_dtype(denoise_weight.scalar_type()) &&
                  (!denoise_bias.has_value() || is_float_dtype(denoise_bias->scalar_type())) &&
                  (!noise.has_value() || is_float_dtype(noise->scalar_type())),
              "denoise_loss_fwd: x, denoise_weight, denoise_bias and noise must be float16, bfloat16, float32 or "
              "float64");
  TORCH_CHECK(x.device().is_cpu() && denoise_weight.device().is_cpu() &&
                  (!denoise_bias.has_value() || denoise_bias->device().is_cpu()) &&
                  (!noise.has_value() || noise->device().is_cpu()),
              "denoise_loss_fwd (CPU kernel): all tensors must be on the CPU");
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "denoise_loss_fwd: seed must be a 0-d int64 CPU tensor");

  const auto cdt = compute_dtype(x.scalar_type());
  const auto opts = x.options().dtype(cdt);
  at::Tensor loss = at::zeros({}, opts);
  at::Tensor grad_weight = compute_grad ? at::zeros({K, K}, opts) : at::empty({0}, opts);
  at::Tensor grad_bias =
      compute_grad && denoise_bias.has_value() ? at::zeros({K}, opts) : at::empty({0}, opts);
  if (M == 0 || K == 0) {
    return {loss, grad_weight, grad_bias};  // an empty batch has loss 0, not 0/0
  }
  // The seed is read only for in-kernel noise; given noise leaves it unused.
  const uint64_t seed_value = noise.has_value() ? 0 : static_cast<uint64_t>(seed.item<int64_t>());
  // K x K and K: cast once (a copy only when the dtype differs or the layout is not dense).
  // Detached: the BLAS calls on them must not record autograd history (this op has none).
  const at::Tensor weight = denoise_weight.detach().to(cdt).contiguous();
  const at::Tensor bias =
      denoise_bias.has_value() ? denoise_bias->detach().to(cdt).contiguous() : at::zeros({K}, opts);
  // The ATen calls inside (views of the buffers, the GEMMs) go straight to the CPU kernels:
  // this op has no autograd, and autograd's view and version tracking took a fifth of its
  // host time at 197 x 8 (33 us per call against 27 us without). The outputs were made above, as usual.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  AT_DISPATCH_FLOATING_TYPES(cdt, "denoise_loss_fwd_cpu", [&] {
    denoise_loss_cpu_impl<scalar_t>(x, weight, bias, a, s, noise, seed_value, compute_grad, loss, grad_weight,
                                    grad_bias);
  });
  return {loss, grad_weight, grad_bias};
}

// drep::_denoise_noise (test hook, csrc/ops.cpp): this kernel's own eps rows. The CPU kernel
// has one path for every element, so per_element changes nothing here.
at::Tensor denoise_noise_cpu(const at::Tensor& like, const at::Tensor& seed, int64_t row0, int64_t rows,
                             int64_t cols, bool per_element) {
  (void)like;
  (void)per_element;
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong, "seed must be a 0-d int64 tensor");
  TORCH_CHECK(row0 >= 0 && rows >= 0 && cols >= 0, "row0, rows and cols must be >= 0");
  at::Tensor out = at::empty({rows, cols}, seed.options().dtype(at::kFloat));
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  float* p = out.data_ptr<float>();
  noise_rows(s, static_cast<uint64_t>(row0), rows, cols, p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(drep, CPU, m) {
  m.impl("denoise_loss_fwd", &denoise_loss_fwd_cpu);
  m.impl("_denoise_noise", &denoise_noise_cpu);
}

}  // namespace drep
