// The float constants of the vector noise paths (noise_avx2.cpp, noise_avx512.cpp), in one
// place: both paths run the same operations on the same constants, so their normals agree bit
// for bit (IEEE add, mul, fma, sqrt and conversions round alike at any width).
#pragma once

namespace drep {
namespace noise_poly {

// word_to_uniform (csrc/philox.h): 2^-31, and the radius uniform's floor (N1).
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kMinRadiusUniform = 1.0e-7f;
constexpr float kTwoPi = 6.283185307179586f;

// ln(1 + f), f in [sqrt(1/2) - 1, sqrt(2) - 1): Cephes' logf, f - f^2 / 2 + f^3 P(f) with P's
// coefficients highest first; ln 2 = kLn2Hi + kLn2Lo, kLn2Hi with few bits so e ln 2 is exact.
constexpr float kSqrtHalf = 0.707106781186547524f;
constexpr float kLogP[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                            -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                            2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;

// sin and cos of x = r + j pi/4: 4 / pi, pi/4 in three parts (exact products with j), and
// Cephes' cosf / sinf polynomials in z = r^2, highest coefficient first.
constexpr float kFourOverPi = 1.27323954473516f;
constexpr float kPiOver4[3] = {0.78515625f, 2.4187564849853515625e-4f, 3.77489497744594108e-8f};
constexpr float kCosP[3] = {2.443315711809948e-5f, -1.388731625493765e-3f, 4.166664568298827e-2f};
constexpr float kSinP[3] = {-1.9515295891e-4f, 8.3321608736e-3f, -1.6666654611e-1f};

}  // namespace noise_poly
}  // namespace drep
