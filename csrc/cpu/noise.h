// The noise matrix eps of docs/method.md N1 on the CPU, by rows or spans of rows: row m is the
// Q = ceil(K / 4) counters m Q .. m Q + Q - 1, four normals each,
// (r0 cos 2 pi u1, r0 sin 2 pi u1, r2 cos 2 pi u3, r2 sin 2 pi u3), from Philox4x32-10.
// Every path computes csrc/philox.h's integer stream bit for bit; the vector paths take log,
// sin and cos from float polynomials (noise_avx2.cpp), so their normals differ from the
// scalar path's (libm's) by that rounding only. The AVX-512 path runs the AVX2 path's
// operations, 16 lanes wide: its normals are the AVX2 path's, bit for bit.
#pragma once
#include <cstdint>

#include "isa.h"

namespace drep {

// n float32 normals of the stream from counter `first` on (the four of each counter in
// order; the last counter's surplus dropped), on the path cpu_path() picks: fixed per
// process, so every call takes the same one.
void noise_span(uint64_t seed, uint64_t first, int64_t n, float* out);

// Row m of eps, K elements.
inline void noise_row(uint64_t seed, uint64_t m, int64_t K, float* out) {
  noise_span(seed, m * static_cast<uint64_t>((K + 3) / 4), K, out);
}

// Rows m0 .. m0 + rows - 1 of eps, back to back (K apart). When 4 divides K, consecutive rows
// are consecutive counters, so they are one span: short rows then share vector blocks (at
// K = 8 a row alone fills 2 of the AVX-512 path's 16 counters a block).
void noise_rows(uint64_t seed, uint64_t m0, int64_t rows, int64_t K, float* out);

// The paths themselves; the vector ones only where the CPU has their instructions.
void noise_span_scalar(uint64_t seed, uint64_t first, int64_t n, float* out);
#ifdef DREP_HAVE_X86_PATHS
void noise_span_avx2(uint64_t seed, uint64_t first, int64_t n, float* out);
void noise_span_avx512(uint64_t seed, uint64_t first, int64_t n, float* out);
#endif

// Philox4x32-10's ten round keys for `seed`: (seed_lo, seed_hi) plus r times the Weyl
// constants in round r (csrc/philox.h), computed once per row by the vector paths.
struct PhiloxKeys {
  uint32_t k0[10];
  uint32_t k1[10];
};

inline PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys keys;
  keys.k0[0] = static_cast<uint32_t>(seed);
  keys.k1[0] = static_cast<uint32_t>(seed >> 32);
  for (int r = 1; r < 10; ++r) {
    keys.k0[r] = keys.k0[r - 1] + 0x9E3779B9u;
    keys.k1[r] = keys.k1[r - 1] + 0xBB67AE85u;
  }
  return keys;
}

}  // namespace drep
