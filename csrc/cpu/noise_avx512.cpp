// N1 noise rows with AVX-512F, 32 Philox counters (128 elements) at once (noise.h):
// noise_avx2.cpp's operations in 16 lanes (its comments explain the math), so the integer
// stream is csrc/philox.h's and the normals are the AVX2 path's, bit for bit. What the width
// buys: half the instructions per counter, 3-way XORs in one instruction (vpternlogd), masks
// for selects and for the row's last, partial block.
#include "noise.h"

#ifdef DREP_HAVE_X86_PATHS
// GCC 12's AVX-512 intrinsics start from self-initialised "undefined" vectors, which its
// -Wmaybe-uninitialized reports at every use (GCC bug 105593, fixed in GCC 13): not ours.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "noise_poly.h"

namespace drep {
namespace {

using namespace noise_poly;

#define DREP_AVX512 __attribute__((target("avx512f")))

DREP_AVX512 inline __m512 xor_ps(__m512 a, __m512i b) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), b));
}

DREP_AVX512 inline __m512 uniform16(__m512i w) {
  const __m512i folded = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(kUniformScale));
}

// log8: e - 1 and f + m where m < sqrt(1/2) as masked operations; elsewhere log8 subtracts and
// adds +0, which leaves e and f (f < 0 there) bitwise unchanged, as the masks do.
DREP_AVX512 inline __m512 log16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126)));
  const __m512 m = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007FFFFF)), _mm512_set1_epi32(0x3F000000)));
  const __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kSqrtHalf), _CMP_LT_OQ);
  e = _mm512_mask_sub_ps(e, small, e, one);
  const __m512 m_minus_1 = _mm512_sub_ps(m, one);
  const __m512 f = _mm512_mask_add_ps(m_minus_1, small, m_minus_1, m);
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 y = _mm512_set1_ps(kLogP[0]);
  for (int i = 1; i < 9; ++i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kLogP[i]));
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2Lo), y);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2Hi), _mm512_add_ps(f, y));
}

DREP_AVX512 inline void sincos16(__m512 x, __m512* sin_x, __m512* cos_x) {
  __m512i j = _mm512_cvttps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(kFourOverPi)));
  j = _mm512_and_si512(_mm512_add_epi32(j, _mm512_set1_epi32(1)), _mm512_set1_epi32(~1));
  const __m512 y = _mm512_cvtepi32_ps(j);
  __m512 r = _mm512_fnmadd_ps(y, _mm512_set1_ps(kPiOver4[0]), x);
  r = _mm512_fnmadd_ps(y, _mm512_set1_ps(kPiOver4[1]), r);
  r = _mm512_fnmadd_ps(y, _mm512_set1_ps(kPiOver4[2]), r);
  const __m512 z = _mm512_mul_ps(r, r);
  __m512 c = _mm512_set1_ps(kCosP[0]);
  c = _mm512_fmadd_ps(c, z, _mm512_set1_ps(kCosP[1]));
  c = _mm512_fmadd_ps(c, z, _mm512_set1_ps(kCosP[2]));
  c = _mm512_mul_ps(_mm512_mul_ps(c, z), z);
  c = _mm512_add_ps(_mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, c), _mm512_set1_ps(1.0f));
  __m512 s = _mm512_set1_ps(kSinP[0]);
  s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(kSinP[1]));
  s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(kSinP[2]));
  s = _mm512_fmadd_ps(_mm512_mul_ps(s, z), r, r);
  const __m512i q = _mm512_srli_epi32(j, 1);
  const __mmask16 odd = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __m512i cos_sign =
      _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(1)), _mm512_set1_epi32(2)), 30);
  const __m512i sin_sign = _mm512_slli_epi32(_mm512_and_si512(q, _mm512_set1_epi32(2)), 30);
  *cos_x = xor_ps(_mm512_mask_blend_ps(odd, c, s), cos_sign);
  *sin_x = xor_ps(_mm512_mask_blend_ps(odd, s, c), sin_sign);
}

// philox8 on G groups of eight counters (one per 64-bit slot, state words in the low halves):
// w[4 g + i] gets word i of group g.
template <int G>
DREP_AVX512 inline void philox_groups(const __m512i ctr[G], const PhiloxKeys& keys, __m512i w[4 * G]) {
  constexpr int kXor3 = 0x96;  // vpternlog truth table of a ^ b ^ c
  const __m512i round_a = _mm512_set1_epi64(0xD2511F53u);
  const __m512i round_b = _mm512_set1_epi64(0xCD9E8D57u);
  __m512i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {  // round 0: c2 = c3 = 0, so the B product vanishes
    const __m512i prod_a = _mm512_mul_epu32(ctr[g], round_a);
    c0[g] = _mm512_xor_si512(_mm512_srli_epi64(ctr[g], 32), _mm512_set1_epi32(static_cast<int>(keys.k0[0])));
    c1[g] = _mm512_setzero_si512();
    c2[g] = _mm512_xor_si512(_mm512_srli_epi64(prod_a, 32), _mm512_set1_epi32(static_cast<int>(keys.k1[0])));
    c3[g] = prod_a;
  }
  for (int r = 1; r < 10; ++r) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int>(keys.k0[r]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int>(keys.k1[r]));
    for (int g = 0; g < G; ++g) {
      const __m512i prod_b = _mm512_mul_epu32(c2[g], round_b);
      const __m512i prod_a = _mm512_mul_epu32(c0[g], round_a);
      c0[g] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(prod_b, 32), c1[g], k0, kXor3);
      c2[g] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(prod_a, 32), c3[g], k1, kXor3);
      c1[g] = prod_b;
      c3[g] = prod_a;
    }
  }
  for (int g = 0; g < G; ++g) {
    w[4 * g] = c0[g];
    w[4 * g + 1] = c1[g];
    w[4 * g + 2] = c2[g];
    w[4 * g + 3] = c3[g];
  }
}

// The first min(n, 16) of 16 lanes, n >= 1.
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

DREP_AVX512 inline __m512 as_ps(__m512d v) { return _mm512_castpd_ps(v); }
DREP_AVX512 inline __m512d as_pd(__m512 v) { return _mm512_castps_pd(v); }

// The 64 normals of the 16 counters whose words w holds (groups 2 h and 2 h + 1 of
// philox_groups: counters in natural order over the slots of the pair) into out[0, n), n >= 1.
DREP_AVX512 inline void store_normals(const __m512i w[8], float* out, int64_t n) {
  // The packing puts counter pi(s) = 4 (s mod 4) + s / 4 into lane s (the low half of slot
  // pi(s) of the pair is 32-bit element 2 pi(s) of the two vectors); then the in-lane
  // transpose below leaves counters 4 i .. 4 i + 3, their four normals each, in output
  // vector i: in order.
  const __m512i pack = _mm512_setr_epi32(0, 8, 16, 24, 2, 10, 18, 26, 4, 12, 20, 28, 6, 14, 22, 30);
  __m512 normal[4];  // (r0 cos, r0 sin, r2 cos, r2 sin), lanes as above
  for (int pair = 0; pair < 2; ++pair) {
    const __m512 u_r = _mm512_max_ps(uniform16(_mm512_permutex2var_epi32(w[2 * pair], pack, w[4 + 2 * pair])),
                                     _mm512_set1_ps(kMinRadiusUniform));
    const __m512 u_a = uniform16(_mm512_permutex2var_epi32(w[2 * pair + 1], pack, w[4 + 2 * pair + 1]));
    const __m512 radius = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log16(u_r)));
    __m512 sin_t, cos_t;
    sincos16(_mm512_mul_ps(_mm512_set1_ps(kTwoPi), u_a), &sin_t, &cos_t);
    normal[2 * pair] = _mm512_mul_ps(radius, cos_t);
    normal[2 * pair + 1] = _mm512_mul_ps(radius, sin_t);
  }
  // 4 x 16 -> 16 x 4 within 128-bit lanes: vector i = the four normals of four counters.
  const __m512 lo01 = _mm512_unpacklo_ps(normal[0], normal[1]), lo23 = _mm512_unpacklo_ps(normal[2], normal[3]);
  const __m512 hi01 = _mm512_unpackhi_ps(normal[0], normal[1]), hi23 = _mm512_unpackhi_ps(normal[2], normal[3]);
  const __m512 eps[4] = {as_ps(_mm512_unpacklo_pd(as_pd(lo01), as_pd(lo23))),
                         as_ps(_mm512_unpackhi_pd(as_pd(lo01), as_pd(lo23))),
                         as_ps(_mm512_unpacklo_pd(as_pd(hi01), as_pd(hi23))),
                         as_ps(_mm512_unpackhi_pd(as_pd(hi01), as_pd(hi23)))};
  // Masked stores write the row's last elements only (no tail copy, nothing past the row).
  for (int i = 0; i < 4 && 16 * i < n; ++i) _mm512_mask_storeu_ps(out + 16 * i, first_lanes(n - 16 * i), eps[i]);
}

// Elements k .. k + 32 G - 1 of the span whose first counter is `first` (cut at K): G groups
// of eight counters, G even.
template <int G>
DREP_AVX512 inline void noise_block(const PhiloxKeys& keys, uint64_t first, int64_t k, int64_t K, float* out) {
  const __m512i base = _mm512_set1_epi64(static_cast<long long>(first + static_cast<uint64_t>(k / 4)));
  __m512i ctr[G];
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int g = 0; g < G; ++g) ctr[g] = _mm512_add_epi64(base, _mm512_add_epi64(lanes, _mm512_set1_epi64(8 * g)));
  __m512i w[4 * G];
  philox_groups<G>(ctr, keys, w);
  for (int h = 0; h < G / 2 && k + 64 * h < K; ++h) store_normals(w + 8 * h, out + k + 64 * h, K - k - 64 * h);
}

}  // namespace

DREP_AVX512 void noise_span_avx512(uint64_t seed, uint64_t first, int64_t n, float* out) {
  const PhiloxKeys keys = philox_keys(seed);
  // Blocks of 32 counters: 0.90 ns per element on Zen 4 against 1.0 for blocks of 16 (more
  // independent work in flight; 64 would not fit the 32 registers). A span's last block is one
  // of 16 counters when at most 64 elements are left, so short spans compute no normals for nothing.
  int64_t k = 0;
  for (; n - k > 64; k += 128) noise_block<4>(keys, first, k, n, out);
  if (k < n) noise_block<2>(keys, first, k, n, out);
}
#undef DREP_AVX512

}  // namespace drep
#endif  // DREP_HAVE_X86_PATHS
