// N1 noise rows with AVX2 + FMA, eight Philox counters at once (noise.h). The integer stream
// is bit-for-bit csrc/philox.h; log, sin and cos are Cephes-style float polynomials (about
// 1 ulp), so eps matches philox_normal4 to the rounding of log, sin and cos, which is all N1
// promises across backends. noise_avx512.cpp runs these same operations 16 lanes wide.
#include "noise.h"

#ifdef DREP_HAVE_X86_PATHS
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "noise_poly.h"

namespace drep {
namespace {

using namespace noise_poly;

#define DREP_AVX2 __attribute__((target("avx2,fma")))

// uint32 word -> int32 -> fold negatives onto [0, 2^31) -> [0, 1), as word_to_uniform.
DREP_AVX2 inline __m256 uniform8(__m256i w) {
  const __m256i folded = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));  // v < 0: ~v = -v - 1
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(kUniformScale));
}

// Natural log of positive normal floats (here the radius uniforms, in [1e-7, 1)): x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), ln x = e ln 2 + ln(1 + f), f = m - 1, ln(1 + f) by Cephes' logf
// polynomial; ln 2 is split in two so e ln 2 adds no rounding.
DREP_AVX2 inline __m256 log8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  const __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F000000)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrtHalf), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, one));
  const __m256 f = _mm256_add_ps(_mm256_sub_ps(m, one), _mm256_and_ps(small, m));  // exact
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(kLogP[0]);
  for (int i = 1; i < 9; ++i) y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kLogP[i]));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2Lo), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2Hi), _mm256_add_ps(f, y));
}

// sin x and cos x for x in [0, 2 pi]: x = r + j pi/4 with j even and |r| <= pi/4 (pi/4 split
// in three so the reduction is exact to float), then +-sin r or +-cos r by Cephes' sinf/cosf
// polynomials, chosen by the quadrant q = j / 2 mod 4.
DREP_AVX2 inline void sincos8(__m256 x, __m256* sin_x, __m256* cos_x) {
  __m256i j = _mm256_cvttps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(kFourOverPi)));
  j = _mm256_and_si256(_mm256_add_epi32(j, _mm256_set1_epi32(1)), _mm256_set1_epi32(~1));
  const __m256 y = _mm256_cvtepi32_ps(j);
  __m256 r = _mm256_fnmadd_ps(y, _mm256_set1_ps(kPiOver4[0]), x);
  r = _mm256_fnmadd_ps(y, _mm256_set1_ps(kPiOver4[1]), r);
  r = _mm256_fnmadd_ps(y, _mm256_set1_ps(kPiOver4[2]), r);
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 c = _mm256_set1_ps(kCosP[0]);
  c = _mm256_fmadd_ps(c, z, _mm256_set1_ps(kCosP[1]));
  c = _mm256_fmadd_ps(c, z, _mm256_set1_ps(kCosP[2]));
  c = _mm256_mul_ps(_mm256_mul_ps(c, z), z);
  c = _mm256_add_ps(_mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, c), _mm256_set1_ps(1.0f));
  __m256 s = _mm256_set1_ps(kSinP[0]);
  s = _mm256_fmadd_ps(s, z, _mm256_set1_ps(kSinP[1]));
  s = _mm256_fmadd_ps(s, z, _mm256_set1_ps(kSinP[2]));
  s = _mm256_fmadd_ps(_mm256_mul_ps(s, z), r, r);
  // Quadrant q: cos x = (cos r, -sin r, -cos r, sin r)[q], sin x = (sin r, cos r, -sin r, -cos r)[q].
  const __m256i q = _mm256_srli_epi32(j, 1);
  const __m256 odd = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  const __m256 cos_sign = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(2)), 30));
  const __m256 sin_sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(q, _mm256_set1_epi32(2)), 30));
  *cos_x = _mm256_xor_ps(_mm256_blendv_ps(c, s, odd), cos_sign);
  *sin_x = _mm256_xor_ps(_mm256_blendv_ps(s, c, odd), sin_sign);
}

// Philox4x32-10 for two groups of four counters, one counter per 64-bit slot: a state word
// lives in the low half of its slot (the high half is ignored), so _mm256_mul_epu32 yields
// both product words with no shuffling. `ctr[g]` holds the 64-bit counters (c_lo, c_hi) in
// place: low half c0, high half c1. w[4 g + i] gets output word i of group g, in the low
// halves. (The vector multiplier is the bottleneck here: 20 multiplies per counter.)
DREP_AVX2 inline void philox8(const __m256i ctr[2], const uint32_t* key0, const uint32_t* key1, __m256i w[8]) {
  const __m256i round_a = _mm256_set1_epi64x(0xD2511F53u);
  const __m256i round_b = _mm256_set1_epi64x(0xCD9E8D57u);
  __m256i c0[2], c1[2], c2[2], c3[2];
  for (int g = 0; g < 2; ++g) {  // round 0: c2 = c3 = 0, so the B product vanishes
    const __m256i prod_a = _mm256_mul_epu32(ctr[g], round_a);
    c0[g] = _mm256_xor_si256(_mm256_srli_epi64(ctr[g], 32), _mm256_set1_epi32(static_cast<int>(key0[0])));
    c1[g] = _mm256_setzero_si256();
    c2[g] = _mm256_xor_si256(_mm256_srli_epi64(prod_a, 32), _mm256_set1_epi32(static_cast<int>(key1[0])));
    c3[g] = prod_a;
  }
  for (int r = 1; r < 10; ++r) {
    const __m256i k0 = _mm256_set1_epi32(static_cast<int>(key0[r]));
    const __m256i k1 = _mm256_set1_epi32(static_cast<int>(key1[r]));
    for (int g = 0; g < 2; ++g) {
      const __m256i prod_b = _mm256_mul_epu32(c2[g], round_b);
      const __m256i prod_a = _mm256_mul_epu32(c0[g], round_a);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_b, 32), c1[g]), k0);
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_a, 32), c3[g]), k1);
      c1[g] = prod_b;
      c3[g] = prod_a;
    }
  }
  for (int g = 0; g < 2; ++g) {
    w[4 * g] = c0[g];
    w[4 * g + 1] = c1[g];
    w[4 * g + 2] = c2[g];
    w[4 * g + 3] = c3[g];
  }
}

// The low halves of the slots of a and b as eight 32-bit lanes:
// (a0, a1, b0, b1 | a2, a3, b2, b3).
DREP_AVX2 inline __m256i pack_low_halves(__m256i a, __m256i b) {
  return _mm256_castps_si256(
      _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), _MM_SHUFFLE(2, 0, 2, 0)));
}

DREP_AVX2 inline __m256 as_ps(__m256d v) { return _mm256_castpd_ps(v); }
DREP_AVX2 inline __m256d as_pd(__m256 v) { return _mm256_castps_pd(v); }

}  // namespace

DREP_AVX2 void noise_span_avx2(uint64_t seed, uint64_t first, int64_t n, float* out) {
  const PhiloxKeys keys = philox_keys(seed);
  // Counters c .. c + 7 go to the slots so that, packed, lanes 0-3 hold c, c+2, c+4, c+6 and
  // lanes 4-7 hold c+1, c+3, c+5, c+7: then the in-lane transpose below leaves counter
  // c + 2 i in the low and c + 2 i + 1 in the high half of output vector i, in order.
  const __m256i offs[2] = {_mm256_setr_epi64x(0, 2, 1, 3), _mm256_setr_epi64x(4, 6, 5, 7)};
  for (int64_t k = 0; k < n; k += 32) {
    const __m256i base = _mm256_set1_epi64x(static_cast<long long>(first + static_cast<uint64_t>(k / 4)));
    const __m256i ctr[2] = {_mm256_add_epi64(base, offs[0]), _mm256_add_epi64(base, offs[1])};
    __m256i w[8];
    philox8(ctr, keys.k0, keys.k1, w);
    __m256 normal[4];  // (r0 cos, r0 sin, r2 cos, r2 sin), lanes as above
    for (int pair = 0; pair < 2; ++pair) {
      const __m256 u_r = _mm256_max_ps(uniform8(pack_low_halves(w[2 * pair], w[4 + 2 * pair])),
                                        _mm256_set1_ps(kMinRadiusUniform));
      const __m256 u_a = uniform8(pack_low_halves(w[2 * pair + 1], w[4 + 2 * pair + 1]));
      const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log8(u_r)));
      __m256 sin_t, cos_t;
      sincos8(_mm256_mul_ps(_mm256_set1_ps(kTwoPi), u_a), &sin_t, &cos_t);
      normal[2 * pair] = _mm256_mul_ps(radius, cos_t);
      normal[2 * pair + 1] = _mm256_mul_ps(radius, sin_t);
    }
    // 4 x 8 -> 8 x 4 within 128-bit lanes: vector i = the four normals of two counters.
    const __m256 lo01 = _mm256_unpacklo_ps(normal[0], normal[1]), lo23 = _mm256_unpacklo_ps(normal[2], normal[3]);
    const __m256 hi01 = _mm256_unpackhi_ps(normal[0], normal[1]), hi23 = _mm256_unpackhi_ps(normal[2], normal[3]);
    alignas(32) float eps[32];
    _mm256_store_ps(eps, as_ps(_mm256_unpacklo_pd(as_pd(lo01), as_pd(lo23))));
    _mm256_store_ps(eps + 8, as_ps(_mm256_unpackhi_pd(as_pd(lo01), as_pd(lo23))));
    _mm256_store_ps(eps + 16, as_ps(_mm256_unpacklo_pd(as_pd(hi01), as_pd(hi23))));
    _mm256_store_ps(eps + 24, as_ps(_mm256_unpackhi_pd(as_pd(hi01), as_pd(hi23))));
    std::memcpy(out + k, eps, static_cast<size_t>(std::min<int64_t>(32, n - k)) * sizeof(float));
  }
}
#undef DREP_AVX2

}  // namespace drep
#endif  // DREP_HAVE_X86_PATHS
