// Paged causal attention over the routed KV cache, one kernel for prefill, chunked prefill and decode.
//
// Flat tokens carry their cache row and true position. Pass 1 (serial, in token order) gives each
// token the next slot of its row in this layer, takes a block from the free stack when a block
// fills, and writes its roped key and value. Pass 2 (parallel over tokens x heads) attends each
// query over slots [0, its own slot] of its row. A query's arithmetic depends only on its own
// keys, in a fixed order, so its output is the same whether it arrives in a prefill, in a chunk
// of any size or in a decode step, alone or beside other sequences.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace chiar {

namespace {

// r = x * cos + rotate_half(x) * sin, each product rounded (as the eager path computes it)
inline void rope(const float* x, const float* cos, const float* sin, int64_t hd, float* out) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < hd; ++i) {
        const float rotated = i < half ? -x[i + half] : x[i - half];
        out[i] = x[i] * cos[i] + rotated * sin[i];
    }
}

struct Query {
    const float* q;          // roped query [hd]
    const int32_t* table;    // the row's block ids in this layer
    int64_t n_keys;          // attends slots [0, n_keys)
};

struct Pool {
    const float* keys;
    const float* values;
    int64_t heads, block, hd;
    const float* key(const Query& qy, int64_t h, int64_t j) const {
        return keys + ((static_cast<int64_t>(qy.table[j / block]) * heads + h) * block + j % block) * hd;
    }
    const float* value(const Query& qy, int64_t h, int64_t j) const {
        return values + ((static_cast<int64_t>(qy.table[j / block]) * heads + h) * block + j % block) * hd;
    }
    // block g of a row (slots [g * block, (g + 1) * block)): its keys and values, [block][hd] each
    const float* key_block(const Query& qy, int64_t h, int64_t g) const {
        return keys + (static_cast<int64_t>(qy.table[g]) * heads + h) * block * hd;
    }
    const float* value_block(const Query& qy, int64_t h, int64_t g) const {
        return values + (static_cast<int64_t>(qy.table[g]) * heads + h) * block * hd;
    }
};

void attend_one_scalar(const Pool& pool, const Query& qy, int64_t h, float scale, std::vector<float>& s, float* y) {
    const int64_t n = qy.n_keys, hd = pool.hd;
    float top = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
        s[j] = dot_scalar(qy.q, pool.key(qy, h, j), hd) * scale;
        top = std::max(top, s[j]);
    }
    float lanes[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < n; ++j) {
        s[j] = exp_scalar(s[j] - top);
        lanes[j % LANES] = lanes[j % LANES] + s[j];
    }
    const float total = tree8(lanes);
    std::vector<float> acc(hd, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
        const float* v = pool.value(qy, h, j);
        for (int64_t c = 0; c < hd; ++c) acc[c] = std::fma(s[j], v[c], acc[c]);
    }
    for (int64_t c = 0; c < hd; ++c) y[c] = acc[c] / total;
}

#if CHIAR_X86
// scores of the 8 keys of one block (valid of them; the rest repeat the last valid key), each dot
// product in the tree8 order
CHIAR_AVX2 inline __m256 scores8(const float* kb, const float* q, int64_t hd, int64_t valid) {
    __m256 acc[8];
    const float* k[8];
    for (int t = 0; t < 8; ++t) {
        acc[t] = _mm256_setzero_ps();
        k[t] = kb + std::min<int64_t>(t, valid - 1) * hd;
    }
    for (int64_t c = 0; c < hd; c += LANES) {
        const __m256 qv = _mm256_loadu_ps(q + c);
        for (int t = 0; t < 8; ++t) acc[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[t] + c), acc[t]);
    }
    // hadd transpose: key t gets ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)), the tree8 order
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// A tile of queries of one row (so the same blocks; BLOCK == LANES) walks the blocks together: each key
// and value block is read once per tile instead of once per query (a 2k-token row's K and V outgrow
// L2), while every query's own arithmetic is attend_one_scalar's, operation for operation (scores in
// the tree8 order, max, exp, sum, then its values in key order), so its result has the same bits
// whatever tile it falls in.
CHIAR_AVX2 void attend_tile_avx2(const Pool& pool, const Query* qs, int tile, int64_t h, float scale, std::vector<float>& s,
                                 std::vector<float>& acc_buf, float* const* ys) {
    const int64_t hd = pool.hd, chunks = hd / LANES;
    int64_t n_max = 0;
    for (int q = 0; q < tile; ++q) n_max = std::max(n_max, qs[q].n_keys);
    const int64_t stride = (n_max + LANES - 1) / LANES * LANES;  // scores of query q at s[q * stride]
    const __m256 sc = _mm256_set1_ps(scale);
    for (int64_t g = 0; g * LANES < n_max; ++g) {
        const float* kb = pool.key_block(qs[tile - 1], h, g);  // the rows are one: any query's table
        for (int q = 0; q < tile; ++q) {
            const int64_t valid = std::min<int64_t>(LANES, qs[q].n_keys - g * LANES);
            if (valid <= 0) continue;
            _mm256_storeu_ps(s.data() + q * stride + g * LANES, _mm256_mul_ps(scores8(kb, qs[q].q, hd, valid), sc));
        }
    }
    std::vector<float> sums(tile);
    for (int q = 0; q < tile; ++q) {
        float* sq = s.data() + q * stride;
        const int64_t n = qs[q].n_keys, groups = (n + LANES - 1) / LANES;
        float top = -INFINITY;
        for (int64_t j = 0; j < n; ++j) top = std::max(top, sq[j]);
        const __m256 tv = _mm256_set1_ps(top);
        __m256 total = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
            __m256 p = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sq + g * LANES), tv));
            const int64_t valid = std::min<int64_t>(LANES, n - g * LANES);
            if (valid < LANES) {
                const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                p = _mm256_and_ps(p, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), idx)));
            }
            _mm256_storeu_ps(sq + g * LANES, p);
            total = _mm256_add_ps(total, p);
        }
        sums[q] = tree8(total);
    }
    std::fill(acc_buf.begin(), acc_buf.begin() + tile * hd, 0.0f);
    for (int64_t g = 0; g * LANES < n_max; ++g) {
        const float* vb = pool.value_block(qs[tile - 1], h, g);
        for (int q = 0; q < tile; ++q) {
            const int64_t valid = std::min<int64_t>(LANES, qs[q].n_keys - g * LANES);
            if (valid <= 0) continue;
            float* a = acc_buf.data() + q * hd;
            const float* sq = s.data() + q * stride + g * LANES;
            for (int64_t c = 0; c < chunks; ++c) {
                __m256 acc = _mm256_loadu_ps(a + c * LANES);
                for (int64_t t = 0; t < valid; ++t)
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(sq[t]), _mm256_loadu_ps(vb + t * hd + c * LANES), acc);
                _mm256_storeu_ps(a + c * LANES, acc);
            }
        }
    }
    for (int q = 0; q < tile; ++q) {
        const __m256 sum = _mm256_set1_ps(sums[q]);
        for (int64_t c = 0; c < chunks; ++c)
            _mm256_storeu_ps(ys[q] + c * LANES, _mm256_div_ps(_mm256_loadu_ps(acc_buf.data() + q * hd + c * LANES), sum));
    }
}
#endif

}  // namespace

void attend(const torch::Tensor& qkv, const torch::Tensor& rows, const torch::Tensor& positions, int64_t layer, PagedCache& cache,
            const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& y, torch::Tensor& keys_seen) {
    const int64_t n = qkv.size(0);
    const int64_t heads = cache.keys.size(1), block = cache.keys.size(2), hd = cache.keys.size(3);
    const int64_t D = heads * hd;
    TORCH_CHECK(qkv.size(1) == 3 * D, "attend: qkv must be [n, 3 * ", D, "], got ", qkv.sizes());
    const int64_t max_blocks = cache.tables.size(2), n_layers = cache.tables.size(1);
    TORCH_CHECK(layer >= 0 && layer < n_layers, "attend: layer ", layer, " out of range");
    const float* src = qkv.data_ptr<float>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    int32_t* tables = cache.tables.data_ptr<int32_t>();
    int32_t* lengths = cache.lengths.data_ptr<int32_t>();
    int32_t* free_stack = cache.free_stack.data_ptr<int32_t>();
    int64_t& free_top = *cache.free_top.data_ptr<int64_t>();
    float* keys = cache.keys.data_ptr<float>();
    float* values = cache.values.data_ptr<float>();
    const float* cos_t = cos.data_ptr<float>();
    const float* sin_t = sin.data_ptr<float>();
    const int64_t max_pos = cos.size(0);
    int32_t* seen = keys_seen.data_ptr<int32_t>();

    std::vector<float> q_rot(n * D);
    int64_t max_keys = 0;
    for (int64_t i = 0; i < n; ++i) {  // pass 1: slots, blocks, roped K/V into the cache
        TORCH_CHECK(pos[i] >= 0 && pos[i] < max_pos, "attend: position ", pos[i], " outside the rotary table");
        int32_t& length = lengths[row[i] * n_layers + layer];
        const int64_t slot = length;
        TORCH_CHECK(slot / block < max_blocks, "attend: row ", row[i], " is full (", slot, " entries)");
        int32_t* table = tables + (row[i] * n_layers + layer) * max_blocks;
        if (slot % block == 0) {
            TORCH_CHECK(free_top > 0, "attend: no free KV block (the caller reserves them before the step)");
            table[slot / block] = free_stack[--free_top];
        }
        const int64_t b = table[slot / block];
        const float* c = cos_t + pos[i] * hd;
        const float* s = sin_t + pos[i] * hd;
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t at = ((b * heads + h) * block + slot % block) * hd;
            rope(src + i * 3 * D + h * hd, c, s, hd, q_rot.data() + i * D + h * hd);
            rope(src + i * 3 * D + D + h * hd, c, s, hd, keys + at);
            std::memcpy(values + at, src + i * 3 * D + 2 * D + h * hd, sizeof(float) * hd);
        }
        length = static_cast<int32_t>(slot + 1);
        seen[i] = static_cast<int32_t>(slot + 1);
        max_keys = std::max<int64_t>(max_keys, slot + 1);
    }

    const Pool pool{keys, values, heads, block, hd};
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const bool avx2 = use_avx2() && hd % LANES == 0 && hd <= 256 && block == LANES;
    float* out = y.data_ptr<float>();
    // tiles: up to TILE consecutive tokens of one row (a decode token is a tile of one)
    constexpr int TILE = 16;
    std::vector<int64_t> starts;
    for (int64_t i = 0; i < n; ++i)
        if (i == 0 || row[i] != row[i - 1] || i - starts.back() == TILE) starts.push_back(i);
    starts.push_back(n);
    const int64_t tiles = static_cast<int64_t>(starts.size()) - 1;
    int64_t work = 0;
    for (int64_t i = 0; i < n; ++i) work += seen[i];
    const int64_t per_task = std::max<int64_t>(1, work * hd * 2 * heads / std::max<int64_t>(1, tiles * heads));
    at::parallel_for(0, tiles * heads, std::max<int64_t>(1, 65536 / per_task), [&](int64_t begin, int64_t end) {
        std::vector<float> s((max_keys + LANES) * TILE), acc(TILE * hd);
        for (int64_t t = begin; t < end; ++t) {
            const int64_t first = starts[t / heads], last = starts[t / heads + 1], h = t % heads;
            Query qs[TILE];
            float* ys[TILE];
            for (int64_t i = first; i < last; ++i) {
                qs[i - first] = Query{q_rot.data() + i * D + h * hd, tables + (row[i] * n_layers + layer) * max_blocks, seen[i]};
                ys[i - first] = out + i * D + h * hd;
            }
#if CHIAR_X86
            if (avx2) {
                attend_tile_avx2(pool, qs, static_cast<int>(last - first), h, scale, s, acc, ys);
                continue;
            }
#endif
            for (int64_t i = first; i < last; ++i) attend_one_scalar(pool, qs[i - first], h, scale, s, ys[i - first]);
        }
    });
    (void)avx2;
}

}  // namespace chiar
