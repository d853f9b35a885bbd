#include "noise.h"

#include <algorithm>
#include <cstring>

#include "../philox.h"

namespace drep {

void noise_span_scalar(uint64_t seed, uint64_t first, int64_t n, float* out) {
  for (int64_t k = 0; k < n; k += 4) {
    float four[4];
    philox_normal4(seed, first + static_cast<uint64_t>(k / 4), four);
    std::memcpy(out + k, four, static_cast<size_t>(std::min<int64_t>(4, n - k)) * sizeof(float));
  }
}

void noise_span(uint64_t seed, uint64_t first, int64_t n, float* out) {
  switch (cpu_path()) {
#ifdef DREP_HAVE_X86_PATHS
    case CpuPath::kAvx512: return noise_span_avx512(seed, first, n, out);
    case CpuPath::kAvx2: return noise_span_avx2(seed, first, n, out);
#endif
    default: return noise_span_scalar(seed, first, n, out);
  }
}

void noise_rows(uint64_t seed, uint64_t m0, int64_t rows, int64_t K, float* out) {
  if (K % 4 == 0) return noise_span(seed, m0 * static_cast<uint64_t>(K / 4), rows * K, out);
  for (int64_t r = 0; r < rows; ++r) noise_row(seed, m0 + static_cast<uint64_t>(r), K, out + r * K);
}

}  // namespace drep
