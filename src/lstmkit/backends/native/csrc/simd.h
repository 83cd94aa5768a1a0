// One SIMD vector of floats (AVX-512, AVX2 with FMA, or four plain floats elsewhere) and the
// operations the kernels need on it: the products' loads, broadcasts and multiply-adds
// (panels.cpp), the arithmetic of the gates' exp, sigmoid and tanh, and layer norm's sums
// (cell.h).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lstmkit {
namespace {

using std::int64_t;

#if defined(__AVX2__)
// out[q] = the sum of the eight lanes of v[q], q < 8: three rounds of pairwise adds, instead of
// eight stores and 56 scalar adds.
inline void lane_sums8(const __m256* v, float* out) {
  __m256 pairs[4];
  for (int q = 0; q < 4; ++q) pairs[q] = _mm256_hadd_ps(v[2 * q], v[2 * q + 1]);
  const __m256 low = _mm256_hadd_ps(pairs[0], pairs[1]);   // v0..v3: halves of each 128 bits
  const __m256 high = _mm256_hadd_ps(pairs[2], pairs[3]);  // v4..v7
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                                      _mm256_permute2f128_ps(low, high, 0x31)));
}
#endif

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using Vec = __m512;
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec broadcast(float x) { return _mm512_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
// min and max return their second operand where either is NaN: NaN in x stays NaN
inline Vec clamp(Vec x, float lo, float hi) {
  return _mm512_max_ps(broadcast(lo), _mm512_min_ps(broadcast(hi), x));
}
inline Vec round_nearest(Vec x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// 2^n for whole numbers n (as floats) in the exponent's normal range
inline Vec exp2_whole(Vec n) {
  const __m512i bits = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 23));
}
// out[q] = the sum of the lanes of v[q], q < 8
inline void lane_sums8(const Vec* v, float* out) {
  __m256 halves[8];
  for (int q = 0; q < 8; ++q) {
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[q]), 1));
    halves[q] = _mm256_add_ps(_mm512_castps512_ps256(v[q]), high);
  }
  lane_sums8(halves, out);
}
inline float sum_lanes(Vec v) { return _mm512_reduce_add_ps(v); }
constexpr int kMaxRows = 12;  // of a product's tile: 32 registers, 24 accumulators
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
using Vec = __m256;
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec broadcast(float x) { return _mm256_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec clamp(Vec x, float lo, float hi) {
  return _mm256_max_ps(broadcast(lo), _mm256_min_ps(broadcast(hi), x));
}
inline Vec round_nearest(Vec x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline Vec exp2_whole(Vec n) {
  const __m256i bits = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 23));
}
inline float sum_lanes(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
constexpr int kMaxRows = 6;  // 16 registers: 12 accumulators
#else
constexpr int64_t kLanes = 4;
struct Vec {
  float v[kLanes];
};
inline Vec load(const float* p) {
  Vec r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
inline void store(float* p, Vec v) { std::memcpy(p, v.v, sizeof v.v); }
inline Vec broadcast(float x) { return Vec{{x, x, x, x}}; }
template <typename Op>
Vec lanewise(Vec a, Vec b, Op op) {
  for (int64_t j = 0; j < kLanes; ++j) a.v[j] = op(a.v[j], b.v[j]);
  return a;
}
inline Vec fma(Vec a, Vec b, Vec c) {
  for (int64_t j = 0; j < kLanes; ++j) c.v[j] += a.v[j] * b.v[j];
  return c;
}
inline Vec add(Vec a, Vec b) {
  return lanewise(a, b, [](float x, float y) { return x + y; });
}
inline Vec sub(Vec a, Vec b) {
  return lanewise(a, b, [](float x, float y) { return x - y; });
}
inline Vec mul(Vec a, Vec b) {
  return lanewise(a, b, [](float x, float y) { return x * y; });
}
inline Vec div(Vec a, Vec b) {
  return lanewise(a, b, [](float x, float y) { return x / y; });
}
inline Vec clamp(Vec x, float lo, float hi) {
  for (float& lane : x.v) lane = lane < lo ? lo : (lane > hi ? hi : lane);
  return x;
}
inline Vec round_nearest(Vec x) {  // to nearest, ties to even, for |x| < 2^22
  for (float& lane : x.v) lane = (lane + 12582912.0f) - 12582912.0f;
  return x;
}
inline Vec exp2_whole(Vec n) {
  for (float& lane : n.v) {
    const std::int32_t bits = (static_cast<std::int32_t>(lane) + 127) << 23;
    std::memcpy(&lane, &bits, sizeof lane);
  }
  return n;
}
inline void lane_sums8(const Vec* v, float* out) {
  for (int q = 0; q < 8; ++q) out[q] = v[q].v[0] + v[q].v[1] + v[q].v[2] + v[q].v[3];
}
inline float sum_lanes(Vec v) { return v.v[0] + v.v[1] + v.v[2] + v.v[3]; }
constexpr int kMaxRows = 6;
#endif

// Keeps v in a register as it is: the compiler would otherwise fold its load into every
// multiply-add that reads it, and run out of loads (an empty asm it cannot see through).
inline void pin(Vec& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__AVX2__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

}  // namespace
}  // namespace lstmkit
