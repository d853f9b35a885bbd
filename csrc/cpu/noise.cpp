#include "noise.h"

#include <algorithm>
#include <cstring>

#include "../philox.h"

namespace drep {

void noise_row_scalar(uint64_t seed, uint64_t m, int64_t K, float* out) {
  const uint64_t Q = static_cast<uint64_t>((K + 3) / 4);
  for (int64_t k = 0; k < K; k += 4) {
    float four[4];
    philox_normal4(seed, m * Q + static_cast<uint64_t>(k / 4), four);
    std::memcpy(out + k, four, static_cast<size_t>(std::min<int64_t>(4, K - k)) * sizeof(float));
  }
}

void noise_row(uint64_t seed, uint64_t m, int64_t K, float* out) {
  switch (cpu_path()) {
#ifdef DREP_HAVE_X86_PATHS
    case CpuPath::kAvx512: return noise_row_avx512(seed, m, K, out);
    case CpuPath::kAvx2: return noise_row_avx2(seed, m, K, out);
#endif
    default: return noise_row_scalar(seed, m, K, out);
  }
}

}  // namespace drep
