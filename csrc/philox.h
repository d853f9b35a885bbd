// The counter-based noise stream shared by every backend (docs/method.md, "Noise", N1):
// element (m, k) of an M x K noise matrix is output k mod 4 of the counter c = m Q + k / 4,
// Q = ceil(K / 4), where one counter gives four normals by Box-Muller of the four words of
// Philox4x32-10(key = (seed_lo, seed_hi), counter = (c_lo, c_hi, 0, 0)).
// Bit-for-bit the same integer stream as Triton's tl.randn4x(seed, c) and
// drep_kernels/rng.py; the normals differ only by the rounding of log/sin/cos/sqrt.
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

// The four 32-bit outputs of Philox4x32-10 at counter `counter` under key `seed`.
DREP_HOST_DEVICE void philox_words(uint64_t seed, uint64_t counter, uint32_t w[4]) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
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
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// A uint32 word read as int32, negatives folded onto [0, 2^31): v < 0 becomes -v - 1, written
// ~v because -v overflows for v = INT32_MIN (undefined behaviour). constexpr so that a compile-
// time check (tests/cuda_host) can evaluate it at INT32_MIN, where overflow is an error.
DREP_HOST_DEVICE constexpr int32_t fold_word(uint32_t w) {
  const int32_t v = static_cast<int32_t>(w);
  return v < 0 ? ~v : v;
}

// fold_word scaled into [0, 1).
DREP_HOST_DEVICE float word_to_uniform(uint32_t w) { return static_cast<float>(fold_word(w)) * 4.6566127342e-10f; }

// Box-Muller's radius sqrt(-2 ln u) from one word, and below sin and cos of its angle 2 pi u
// from another.
DREP_HOST_DEVICE float box_muller_radius(uint32_t w) {
  float u = word_to_uniform(w);
  u = u < 1.0e-7f ? 1.0e-7f : u;
#if defined(__CUDA_ARCH__)
  return sqrtf(-2.0f * logf(u));
#else
  return std::sqrt(-2.0f * std::log(u));
#endif
}

// On the device sincospif(2 u), not sincosf(2 pi u): sincosf carries a slow path for huge
// arguments (a Payne-Hanek reduction over a table in local memory) that gave every noise kernel
// a stack frame, though the angle never exceeds 2 pi; sincospif has none. 2 u is exact, so the
// device takes sin and cos of the exact angle where the host (like rng.py and Triton) takes them
// of the float32 product 2 pi u: the normals differ by that product's rounding, at most ~4e-7
// times the radius.
DREP_HOST_DEVICE void box_muller_sin_cos(uint32_t w, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincospif(2.0f * word_to_uniform(w), s, c);
#else
  const float angle = 6.283185307179586f * word_to_uniform(w);
  *s = std::sin(angle);
  *c = std::cos(angle);
#endif
}

// The four normals of counter `counter` (N1): (r0 cos t1, r0 sin t1, r2 cos t3, r2 sin t3).
DREP_HOST_DEVICE void philox_normal4(uint64_t seed, uint64_t counter, float out[4]) {
  uint32_t w[4];
  philox_words(seed, counter, w);
#if defined(__CUDA_ARCH__)
#pragma unroll  // constant indices into w and out: registers, not local memory
#endif
  for (int pair = 0; pair < 2; ++pair) {
    const float r = box_muller_radius(w[2 * pair]);
    float s, c;
    box_muller_sin_cos(w[2 * pair + 1], &s, &c);
    out[2 * pair] = r * c;
    out[2 * pair + 1] = r * s;
  }
}

}  // namespace drep
