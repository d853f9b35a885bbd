// The counter-based noise stream shared by every backend (docs/method.md, "Noise"):
// eps[i] for flat element index i = Box-Muller of the first two words of
// Philox4x32-10(key = (seed_lo, seed_hi), counter = (i_lo, i_hi, 0, 0)).
// Bit-for-bit the same integer stream as Triton's tl.randn(seed, i) and
// drep_kernels/rng.py; the normal differs only by the rounding of log/cos/sqrt.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DREP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DREP_HOST_DEVICE inline
#endif

namespace drep {

DREP_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// First two 32-bit outputs of Philox4x32-10 at counter `index` under key `seed`.
DREP_HOST_DEVICE void philox_two_words(uint64_t seed, uint64_t index, uint32_t* w0, uint32_t* w1) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32), c2 = 0, c3 = 0;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    uint32_t hi_b, hi_a;
    const uint32_t lo_b = mulhilo32(0xCD9E8D57u, c2, &hi_b);
    const uint32_t lo_a = mulhilo32(0xD2511F53u, c0, &hi_a);
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  *w0 = c0;
  *w1 = c1;
}

// A uint32 word read as int32, negatives folded onto [0, 2^31), scaled into [0, 1).
DREP_HOST_DEVICE float word_to_uniform(uint32_t w) {
  int32_t v = static_cast<int32_t>(w);
  v = v < 0 ? -v - 1 : v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

// Standard normal eps for flat element index `index` under `seed`.
DREP_HOST_DEVICE float philox_normal(uint64_t seed, uint64_t index) {
  uint32_t w0, w1;
  philox_two_words(seed, index, &w0, &w1);
  float u1 = word_to_uniform(w0);
  u1 = u1 < 1.0e-7f ? 1.0e-7f : u1;
  const float u2 = word_to_uniform(w1);
#if defined(__CUDA_ARCH__)
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
#else
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.283185307179586f * u2);
#endif
}

}  // namespace drep
