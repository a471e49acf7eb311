// Batched next-token sampling: one row per sequence, each with its own temperature, top-k, top-p and
// uniform draw. A row's token depends only on its own logits and draw (fixed orders throughout), so
// it is the same alone or in any batch.
//
// Per row: non-finite logits (or logits / T overflowing) -> -1. T == 0 -> the first maximum. Else
// e_i = exp(l_i / T - max) on the tokens top-k keeps; top-p keeps the most probable tokens whose mass
// first reaches p of the total: masses are summed into 1/32-octave buckets of e, the bucket where the
// running mass crosses p is sorted, and the threshold is the value that crosses it; finally the
// inverse CDF at u * (kept mass), walked in vocabulary order in blocks of 8.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels.h"

namespace chiar {

namespace {

constexpr int OCTAVE_STEPS = 32;
constexpr int BUCKETS = 128 * OCTAVE_STEPS;

// e in (0, 1]: bucket 0 holds the largest values; OCTAVE_STEPS sub-buckets per factor of two. For a
// positive float, bits >> 18 is exponent * 32 + the top five mantissa bits, so the bucket is
// (127 - exponent) * 32 + 31 - sub = 4095 - (bits >> 18).
// Values at or below the floor go to one of eight dump slots after the buckets (never a nucleus
// bucket; lane i % 8), so their adds do not form one serial chain through a single slot.
constexpr int DUMP = BUCKETS;
constexpr int SLOTS = BUCKETS + LANES;

inline int32_t bucket_of(float e, float floor, int64_t i) {
    if (!(e > floor)) return DUMP + static_cast<int32_t>(i % LANES);
    uint32_t bits;
    std::memcpy(&bits, &e, sizeof(bits));
    return std::clamp(4095 - static_cast<int32_t>(bits >> 18), 0, BUCKETS - 1);
}

// bucket[i] = bucket_of(e[i], floor)
void buckets_of(const float* e, int64_t n, float floor, int32_t* bucket) {
    int64_t i = 0;
#if CHIAR_X86
    if (use_avx2()) {
        buckets8_avx2(e, n - n % LANES, floor, bucket);
        i = n - n % LANES;
    }
#endif
    for (; i < n; ++i) bucket[i] = bucket_of(e[i], floor, i);
}

// the indices i with bucket[i] == b, ascending
void members_of(const int32_t* bucket, int64_t n, int32_t b, std::vector<int64_t>& members) {
    members.clear();
    int64_t i = 0;
#if CHIAR_X86
    if (use_avx2()) {
        members8_avx2(bucket, n - n % LANES, b, members);
        i = n - n % LANES;
    }
#endif
    for (; i < n; ++i)
        if (bucket[i] == b) members.push_back(i);
}

// min and max of the row; false if any value is not finite
bool finite_range(const float* v, int64_t n, float& low, float& top) {
    low = INFINITY;
    top = -INFINITY;
#if CHIAR_X86
    if (use_avx2() && n >= LANES) return finite_range_avx2(v, n, low, top);
#endif
    for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(v[i])) return false;
        low = std::min(low, v[i]);
        top = std::max(top, v[i]);
    }
    return true;
}

// e[i] = v[i] / t (the same division the reference does)
void divide(const float* v, int64_t n, float t, float* e) {
    int64_t i = 0;
#if CHIAR_X86
    if (use_avx2())
        for (; i + LANES <= n; i += LANES) divide8_avx2(v + i, t, e + i);
#endif
    for (; i < n; ++i) e[i] = v[i] / t;
}

// v[i] = exp(v[i] - shift) where v[i] >= keep_from, else 0
void exp_shifted(float* v, int64_t n, float shift, float keep_from) {
    int64_t i = 0;
#if CHIAR_X86
    if (use_avx2())
        for (; i + LANES <= n; i += LANES) exp8_shifted_avx2(v + i, shift, keep_from);
#endif
    for (; i < n; ++i) v[i] = v[i] >= keep_from ? exp_scalar(v[i] - shift) : 0.0f;
}

// tree8 of each block of 8 (zero-padded), summed block after block
float block_sum(const float* v, int64_t n) {
    float total = 0.0f;
    int64_t g = 0;
#if CHIAR_X86
    if (use_avx2()) {
        total = block_sum_avx2(v, n - n % LANES);
        g = n - n % LANES;
    }
#endif
    for (; g < n; g += LANES) {
        float lanes[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t j = g; j < std::min(n, g + LANES); ++j) lanes[j - g] = v[j];
        total = total + tree8(lanes);
    }
    return total;
}

// the k-th largest of v (k < n): a min-heap of the k largest for small k, else a partial sort of a copy
float kth_largest(const float* v, int64_t n, int64_t k, std::vector<float>& scratch) {
    if (k <= 256) {
        scratch.assign(v, v + k);
        std::make_heap(scratch.begin(), scratch.end(), std::greater<float>());
        for (int64_t i = k; i < n; ++i) {
            if (v[i] > scratch.front()) {
                std::pop_heap(scratch.begin(), scratch.end(), std::greater<float>());
                scratch.back() = v[i];
                std::push_heap(scratch.begin(), scratch.end(), std::greater<float>());
            }
        }
        return scratch.front();
    }
    scratch.assign(v, v + n);
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
    return scratch[k - 1];
}

// the smallest kept value: tokens with e >= it make up the most probable mass reaching target
float top_p_threshold(const float* e, int64_t n, float target, float floor, std::vector<float>& mass, std::vector<int64_t>& members,
                      std::vector<int32_t>& bucket) {
    // branch-free: a value at or below the floor goes to a dump slot (a branch mispredicts on real
    // logits, ~69% of whose tokens clear the floor)
    buckets_of(e, n, floor, bucket.data());
    mass.assign(SLOTS, 0.0f);
    for (int64_t i = 0; i < n; ++i) mass[bucket[i]] += e[i];
    float cum = 0.0f;
    int b = 0;
    for (; b < BUCKETS; ++b) {
        if (cum + mass[b] >= target) break;
        cum += mass[b];
    }
    if (b == BUCKETS) return 0.0f;  // rounding: keep every token
    members_of(bucket.data(), n, b, members);
    std::sort(members.begin(), members.end(), [e](int64_t a, int64_t c) { return e[a] > e[c] || (e[a] == e[c] && a < c); });
    float threshold = e[members.back()];
    for (int64_t i : members) {
        cum += e[i];
        if (cum >= target) {
            threshold = e[i];
            break;
        }
    }
    return threshold;
}

struct Scratch {
    std::vector<float> e, heap, mass, blocks;
    std::vector<int64_t> members;
    std::vector<int32_t> bucket;
    explicit Scratch(int64_t n) : e(n), mass(SLOTS), blocks((n + LANES - 1) / LANES), bucket(n) {}
};

// zero the values below `threshold` and return the tree8 sum of each block of 8 (zero-padded)
void kept_block_sums(float* e, int64_t n, float threshold, float* blocks) {
    int64_t g = 0;
#if CHIAR_X86
    if (use_avx2()) {
        kept_block_sums_avx2(e, n - n % LANES, threshold, blocks);
        g = n - n % LANES;
    }
#endif
    for (; g < n; g += LANES) {
        float lanes[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t j = g; j < std::min(n, g + LANES); ++j) {
            if (e[j] < threshold) e[j] = 0.0f;
            lanes[j - g] = e[j];
        }
        blocks[g / LANES] = tree8(lanes);
    }
}

// inverse CDF at u * (kept mass), in vocabulary order: blocks of 8 summed in order, then the tokens
// of the block where the running mass crosses the target
int64_t walk(const float* e, int64_t n, const float* blocks, float uniform) {
    const int64_t groups = (n + LANES - 1) / LANES;
    float total = 0.0f;
    for (int64_t g = 0; g < groups; ++g) total = total + blocks[g];
    const float target = uniform * total;
    float acc = 0.0f;
    int64_t last = -1;
    for (int64_t g = 0; g < groups; ++g) {
        if (blocks[g] <= 0.0f) continue;
        const int64_t begin = g * LANES, end = std::min(n, begin + LANES);
        if (acc + blocks[g] >= target) {
            float inner = acc;
            for (int64_t j = begin; j < end; ++j) {
                if (e[j] <= 0.0f) continue;
                inner = inner + e[j];
                if (inner >= target) return j;
            }
        }
        for (int64_t j = end - 1; j >= begin; --j)
            if (e[j] > 0.0f) {
                last = j;
                break;
            }
        acc = acc + blocks[g];
    }
    return last;  // rounding left the target unreached: the last kept token
}

int64_t sample_row(const float* logits, int64_t n, float temperature, int64_t top_k, float top_p, float uniform, Scratch& w) {
    float low, top;
    if (!finite_range(logits, n, low, top)) return -1;
    if (temperature == 0.0f) return std::find(logits, logits + n, top) - logits;  // the first maximum
    // division is monotone: the scaled row's extremes are the scaled extremes
    const float scaled_top = top / temperature;
    if (!std::isfinite(scaled_top) || !std::isfinite(low / temperature)) return -1;  // a temperature so small that logits / T overflow
    float* e = w.e.data();
    divide(logits, n, temperature, e);
    const float kth = top_k > 0 && top_k < n ? kth_largest(e, n, top_k, w.heap) : -INFINITY;
    exp_shifted(e, n, scaled_top, kth);
    float threshold = 0.0f;
    if (top_p < 1.0f) {
        const float total = block_sum(e, n);
        // a token below floor cannot be in the nucleus: all of them together hold less than 1 - p
        const float floor = (1.0f - top_p) * total / static_cast<float>(n);
        threshold = top_p_threshold(e, n, top_p * total, floor, w.mass, w.members, w.bucket);
    }
    kept_block_sums(e, n, threshold, w.blocks.data());
    return walk(e, n, w.blocks.data(), uniform);
}

}  // namespace

#if CHIAR_X86
CHIAR_AVX2 void exp8_shifted_avx2(float* v, float shift, float keep_from) {
    const __m256 x = _mm256_loadu_ps(v);
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(keep_from), _CMP_GE_OQ);
    _mm256_storeu_ps(v, _mm256_and_ps(exp_avx2(_mm256_sub_ps(x, _mm256_set1_ps(shift))), keep));
}

CHIAR_AVX2 void kept_block_sums_avx2(float* e, int64_t n, float threshold, float* blocks) {
    const __m256 t = _mm256_set1_ps(threshold);
    for (int64_t g = 0; g < n; g += LANES) {
        __m256 v = _mm256_loadu_ps(e + g);
        v = _mm256_and_ps(v, _mm256_cmp_ps(v, t, _CMP_GE_OQ));
        _mm256_storeu_ps(e + g, v);
        blocks[g / LANES] = tree8(v);
    }
}

CHIAR_AVX2 void buckets8_avx2(const float* e, int64_t n, float floor, int32_t* bucket) {
    const __m256 f = _mm256_set1_ps(floor);
    const __m256i top = _mm256_set1_epi32(4095), low = _mm256_setzero_si256(), high = _mm256_set1_epi32(BUCKETS - 1);
    const __m256i dump = _mm256_setr_epi32(DUMP, DUMP + 1, DUMP + 2, DUMP + 3, DUMP + 4, DUMP + 5, DUMP + 6, DUMP + 7);
    for (int64_t i = 0; i < n; i += LANES) {
        const __m256 x = _mm256_loadu_ps(e + i);
        __m256i b = _mm256_sub_epi32(top, _mm256_srli_epi32(_mm256_castps_si256(x), 18));
        b = _mm256_min_epi32(_mm256_max_epi32(b, low), high);
        const __m256i kept = _mm256_castps_si256(_mm256_cmp_ps(x, f, _CMP_GT_OQ));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bucket + i), _mm256_blendv_epi8(dump, b, kept));
    }
}

CHIAR_AVX2 void members8_avx2(const int32_t* bucket, int64_t n, int32_t b, std::vector<int64_t>& members) {
    const __m256i want = _mm256_set1_epi32(b);
    for (int64_t i = 0; i < n; i += LANES) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bucket + i));
        int hits = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(v, want)));
        while (hits) {
            members.push_back(i + __builtin_ctz(hits));
            hits &= hits - 1;
        }
    }
}

CHIAR_AVX2 float block_sum_avx2(const float* v, int64_t n) {
    float total = 0.0f;
    for (int64_t g = 0; g < n; g += LANES) total = total + tree8(_mm256_loadu_ps(v + g));
    return total;
}

CHIAR_AVX2 void divide8_avx2(const float* v, float t, float* e) {
    _mm256_storeu_ps(e, _mm256_div_ps(_mm256_loadu_ps(v), _mm256_set1_ps(t)));
}

CHIAR_AVX2 bool finite_range_avx2(const float* v, int64_t n, float& low, float& top) {
    __m256 best = _mm256_set1_ps(-INFINITY), worst = _mm256_set1_ps(INFINITY);
    __m256 bad = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const __m256 x = _mm256_loadu_ps(v + i);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_NEQ_UQ));  // inf - inf, nan
        best = _mm256_max_ps(best, x);
        worst = _mm256_min_ps(worst, x);
    }
    if (_mm256_movemask_ps(bad)) return false;
    alignas(32) float hi[LANES], lo[LANES];
    _mm256_store_ps(hi, best);
    _mm256_store_ps(lo, worst);
    top = *std::max_element(hi, hi + LANES);
    low = *std::min_element(lo, lo + LANES);
    for (; i < n; ++i) {
        if (!std::isfinite(v[i])) return false;
        top = std::max(top, v[i]);
        low = std::min(low, v[i]);
    }
    return true;
}
#endif

void sample_rows(const float* logits, int64_t rows, int64_t vocab, const float* temperature, const int64_t* top_k, const float* top_p,
                 const float* uniform, int64_t* out) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        Scratch scratch(vocab);
        for (int64_t r = begin; r < end; ++r)
            out[r] = sample_row(logits + r * vocab, vocab, temperature[r], top_k[r], top_p[r], uniform[r], scratch);
    });
}

}  // namespace chiar
