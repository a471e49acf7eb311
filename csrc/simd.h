// Vector helpers shared by the kernels: AVX2+FMA versions and scalar versions that compute the
// *same* bits (same operations, same order, fused multiply-adds where the vector code fuses), so
// results do not depend on which path a CPU takes.
//
// Every reduction here has one fixed order: 8 lanes, lane l accumulating elements l, l+8, l+16, ...
// with fused multiply-adds, then the tree ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)). Nothing depends on
// how many rows a call holds, which is what makes the kernels batch-invariant.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define CHIAR_X86 1
#include <immintrin.h>
#define CHIAR_AVX2 __attribute__((target("avx2,fma")))
#else
#define CHIAR_X86 0
#define CHIAR_AVX2
#endif

namespace chiar {

constexpr int LANES = 8;

// ---------------------------------------------------------------- scalar versions (the definition)
inline float tree8(const float* l) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

// Cephes-style exp on [-88.38, 88.38]: range reduction by ln 2 in two parts, degree-6 polynomial.
inline float exp_scalar(float x) {
    x = std::fmin(x, 88.3762626647949f);
    x = std::fmax(x, -88.3762626647949f);
    float fx = std::floor(std::fma(x, 1.44269504088896341f, 0.5f));
    x = std::fma(-fx, 0.693359375f, x);
    x = std::fma(-fx, -2.12194440e-4f, x);
    float y = 1.9875691500E-4f;
    y = std::fma(y, x, 1.3981999507E-3f);
    y = std::fma(y, x, 8.3334519073E-3f);
    y = std::fma(y, x, 4.1665795894E-2f);
    y = std::fma(y, x, 1.6666665459E-1f);
    y = std::fma(y, x, 5.0000001201E-1f);
    float z = x * x;
    y = std::fma(y, z, x);
    y = y + 1.0f;
    int32_t e = (static_cast<int32_t>(fx) + 127) << 23;
    float scale;
    std::memcpy(&scale, &e, sizeof(scale));
    return y * scale;
}

// Cephes-style natural log for positive normal x: mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial.
inline float log_scalar(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    float e = static_cast<float>((bits >> 23) - 126);
    bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
    float m;
    std::memcpy(&m, &bits, sizeof(m));
    bool small = m < 0.707106781186547524f;
    float tmp = small ? m : 0.0f;
    m = m - 1.0f;
    e = e - (small ? 1.0f : 0.0f);
    m = m + tmp;
    float z = m * m;
    float y = 7.0376836292E-2f;
    y = std::fma(y, m, -1.1514610310E-1f);
    y = std::fma(y, m, 1.1676998740E-1f);
    y = std::fma(y, m, -1.2420140846E-1f);
    y = std::fma(y, m, 1.4249322787E-1f);
    y = std::fma(y, m, -1.6668057665E-1f);
    y = std::fma(y, m, 2.0000714765E-1f);
    y = std::fma(y, m, -2.4999993993E-1f);
    y = std::fma(y, m, 3.3333331174E-1f);
    y = y * m;
    y = y * z;
    y = std::fma(e, -2.12194440e-4f, y);
    y = std::fma(z, -0.5f, y);
    m = m + y;
    return std::fma(e, 0.693359375f, m);
}

inline float silu_scalar(float g) { return g / (1.0f + exp_scalar(-g)); }

// 8-lane fused dot product of n floats (n a multiple of 8, or tail lanes zero-padded), then tree8.
inline float dot_scalar(const float* a, const float* b, int64_t n) {
    float lanes[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; ++i) lanes[i % LANES] = std::fma(a[i], b[i], lanes[i % LANES]);
    return tree8(lanes);
}

#if CHIAR_X86
// ---------------------------------------------------------------- AVX2 versions (same bits)
CHIAR_AVX2 inline float tree8(__m256 v) {
    // ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)), written out so the order is the scalar one
    alignas(32) float l[LANES];
    _mm256_store_ps(l, v);
    return tree8(l);
}

CHIAR_AVX2 inline __m256 exp_avx2(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    __m256 z = _mm256_mul_ps(x, x);
    y = _mm256_fmadd_ps(y, z, x);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

CHIAR_AVX2 inline __m256 log_avx2(__m256 x) {
    __m256i bits = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srai_epi32(bits, 23), _mm256_set1_epi32(126)));
    bits = _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000));
    __m256 m = _mm256_castsi256_ps(bits);
    __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    __m256 tmp = _mm256_and_ps(m, small);
    m = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
    e = _mm256_sub_ps(e, _mm256_and_ps(_mm256_set1_ps(1.0f), small));
    m = _mm256_add_ps(m, tmp);
    __m256 z = _mm256_mul_ps(m, m);
    __m256 y = _mm256_set1_ps(7.0376836292E-2f);
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174E-1f));
    y = _mm256_mul_ps(y, m);
    y = _mm256_mul_ps(y, z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fmadd_ps(z, _mm256_set1_ps(-0.5f), y);
    m = _mm256_add_ps(m, y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), m);
}

CHIAR_AVX2 inline __m256 silu_avx2(__m256 g) {
    __m256 neg = _mm256_sub_ps(_mm256_setzero_ps(), g);
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_avx2(neg)));
}

// n a multiple of 8
CHIAR_AVX2 inline float dot_avx2(const float* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += LANES) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return tree8(acc);
}
#endif

bool cpu_has_avx2();

}  // namespace chiar
