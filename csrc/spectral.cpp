// Per-token kernels around the mixers: RMSNorm, spectral entropy and the MetaRouter gate.
// Every reduction is simd.h's fixed 8-lane order, so a token's result never depends on its neighbours.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace chiar {

namespace {

// sum of squares of a row, in the 8-lane order
inline float sum_squares_scalar(const float* x, int64_t d) { return dot_scalar(x, x, d); }

#if CHIAR_X86
CHIAR_AVX2 void rms_norm_row_avx2(const float* x, int64_t d, const float* w, float eps, float* y) {
    const float ms = dot_avx2(x, x, d) / static_cast<float>(d);
    const float r = 1.0f / std::sqrt(ms + eps);
    const __m256 rv = _mm256_set1_ps(r);
    for (int64_t j = 0; j < d; j += LANES)
        _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), rv), _mm256_loadu_ps(w + j)));
}

CHIAR_AVX2 float entropy_row_avx2(const float* c, int64_t d, float eps, float log_d) {
    const __m256 e = _mm256_set1_ps(eps);
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += LANES) {
        __m256 v = _mm256_loadu_ps(c + j);
        total = _mm256_add_ps(total, _mm256_add_ps(_mm256_mul_ps(v, v), e));
    }
    const __m256 s = _mm256_set1_ps(tree8(total));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += LANES) {
        __m256 v = _mm256_loadu_ps(c + j);
        __m256 p = _mm256_div_ps(_mm256_add_ps(_mm256_mul_ps(v, v), e), s);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(p, log_avx2(p)));
    }
    return -tree8(acc) / log_d;
}
#endif

void rms_norm_row_scalar(const float* x, int64_t d, const float* w, float eps, float* y) {
    const float ms = sum_squares_scalar(x, d) / static_cast<float>(d);
    const float r = 1.0f / std::sqrt(ms + eps);
    for (int64_t j = 0; j < d; ++j) y[j] = (x[j] * r) * w[j];
}

float entropy_row_scalar(const float* c, int64_t d, float eps, float log_d) {
    float lanes[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < d; ++j) lanes[j % LANES] = lanes[j % LANES] + (c[j] * c[j] + eps);
    const float s = tree8(lanes);
    float acc[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < d; ++j) {
        const float p = (c[j] * c[j] + eps) / s;
        acc[j % LANES] = acc[j % LANES] + p * log_scalar(p);
    }
    return -tree8(acc) / log_d;
}

}  // namespace

void rms_norm_into(const float* x, int64_t M, int64_t d, int64_t ldx, const float* w, float eps, float* y) {
    const bool avx2 = use_avx2() && d % LANES == 0;
    at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
#if CHIAR_X86
            if (avx2) {
                rms_norm_row_avx2(x + m * ldx, d, w, eps, y + m * d);
                continue;
            }
#endif
            rms_norm_row_scalar(x + m * ldx, d, w, eps, y + m * d);
        }
    });
    (void)avx2;
}

void entropy_into(const float* coef, int64_t M, int64_t d, float eps, float* out) {
    const bool avx2 = use_avx2() && d % LANES == 0;
    const float log_d = std::log(static_cast<float>(d));
    at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
#if CHIAR_X86
            if (avx2) {
                out[m] = entropy_row_avx2(coef + m * d, d, eps, log_d);
                continue;
            }
#endif
            out[m] = entropy_row_scalar(coef + m * d, d, eps, log_d);
        }
    });
    (void)avx2;
}

void gate_into(const float* x, const int64_t* rows, const int64_t* positions, int64_t n, int64_t d, float* embed_sum,
               const float* w, float b, float* gate) {
    // Serial over tokens: a row's running sum advances token by token, the same order whether its
    // tokens arrive in one prefill, in chunks or one per decode step.
    std::vector<float> mean(d);
    for (int64_t i = 0; i < n; ++i) {
        float* sum = embed_sum + rows[i] * d;
        const float* xi = x + i * d;
        const float count = static_cast<float>(positions[i] + 1);
        for (int64_t j = 0; j < d; ++j) {
            sum[j] = sum[j] + xi[j];
            mean[j] = sum[j] / count;
        }
        const float z = dot_scalar(mean.data(), w, d) + b;
        gate[i] = 1.0f / (1.0f + exp_scalar(-z));
    }
}

}  // namespace chiar
