// y[M, N] = x[M, K] @ W[N, K]^T with W prepacked in panels of 16 output columns.
//
// Layout: packed[P][K][16], P = ceil(N / 16), zero-padded. bf16 panels store each 16-column row in
// the order c0-3 c8-11 c4-7 c12-15, so that unpacking with zeros (vpunpck{l,h}wd) yields columns 0-7
// and 8-15 directly. Every output is one fused multiply-add chain over k = 0..K-1, whatever M is
// and whichever micro-kernel computes it: a row's result never depends on the other rows of the
// call (batch-invariant), and the scalar path gives the same bits as the AVX2 one.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace chiar {

namespace {

constexpr int PANEL = 16;
constexpr int BF16_ORDER[PANEL] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

inline float bf16_to_float(uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

// Column c of a packed k-row: where it sits among the 16 stored values.
inline float packed_value(const PackedWeight& w, int64_t p, int64_t k, int c) {
    int64_t base = (p * w.K + k) * PANEL;
    if (w.bf16) {
        const uint16_t* data = static_cast<const uint16_t*>(w.data.data_ptr());
        return bf16_to_float(data[base + BF16_ORDER[c]]);
    }
    return w.data.data_ptr<float>()[base + c];
}

// Scalar micro-kernel: rows [m0, m0 + mr) x panels [p0, p0 + np) into tile[mr][np * 16].
void tile_scalar(const PackedWeight& w, const float* x, int64_t ldx, int64_t m0, int mr, int64_t p0, int np, float* tile) {
    const int width = np * PANEL;
    for (int r = 0; r < mr; ++r) {
        const float* xr = x + (m0 + r) * ldx;
        for (int j = 0; j < width; ++j) {
            int64_t p = p0 + j / PANEL;
            int c = j % PANEL;
            float acc = 0.0f;
            for (int64_t k = 0; k < w.K; ++k) acc = std::fma(xr[k], packed_value(w, p, k, c), acc);
            tile[r * width + j] = acc;
        }
    }
}

#if CHIAR_X86
template <bool BF16>
CHIAR_AVX2 inline void load_panel_row(const void* panel, int64_t k, __m256& lo, __m256& hi) {
    if constexpr (BF16) {
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(panel) + k * PANEL));
        __m256i zero = _mm256_setzero_si256();
        lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
        hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
    } else {
        const float* f = static_cast<const float*>(panel) + k * PANEL;
        lo = _mm256_loadu_ps(f);
        hi = _mm256_loadu_ps(f + 8);
    }
}

// MR rows x NP panels, 2 * MR * NP accumulators (<= 12 of the 16 registers).
template <int MR, int NP, bool BF16>
CHIAR_AVX2 void tile_avx2(const PackedWeight& w, const float* x, int64_t ldx, int64_t m0, int64_t p0, float* tile) {
    __m256 acc[MR][NP][2];
    for (int r = 0; r < MR; ++r)
        for (int q = 0; q < NP; ++q) acc[r][q][0] = acc[r][q][1] = _mm256_setzero_ps();
    const int64_t K = w.K;
    constexpr size_t elem = BF16 ? 2 : 4;
    const char* base = static_cast<const char*>(w.data.data_ptr()) + p0 * K * PANEL * elem;
    const float* xr[MR];
    for (int r = 0; r < MR; ++r) xr[r] = x + (m0 + r) * ldx;
    for (int64_t k = 0; k < K; ++k) {
        __m256 lo[NP], hi[NP];
        for (int q = 0; q < NP; ++q) load_panel_row<BF16>(base + q * K * PANEL * elem, k, lo[q], hi[q]);
        for (int r = 0; r < MR; ++r) {
            __m256 xv = _mm256_broadcast_ss(xr[r] + k);
            for (int q = 0; q < NP; ++q) {
                acc[r][q][0] = _mm256_fmadd_ps(lo[q], xv, acc[r][q][0]);
                acc[r][q][1] = _mm256_fmadd_ps(hi[q], xv, acc[r][q][1]);
            }
        }
    }
    const int width = NP * PANEL;
    for (int r = 0; r < MR; ++r)
        for (int q = 0; q < NP; ++q) {
            _mm256_storeu_ps(tile + r * width + q * PANEL, acc[r][q][0]);
            _mm256_storeu_ps(tile + r * width + q * PANEL + 8, acc[r][q][1]);
        }
}

// Dispatch on (rows, panels): every choice computes the same per-output chain.
template <bool BF16>
CHIAR_AVX2 void tile_dispatch(const PackedWeight& w, const float* x, int64_t ldx, int64_t m0, int mr, int64_t p0, int np, float* tile) {
    const int width = np * PANEL;
    if (mr == 1 && np == 4) return tile_avx2<1, 4, BF16>(w, x, ldx, m0, p0, tile);
    if (mr <= 3 && np % 2 == 0) {  // pairs of panels
        float sub[3 * 2 * PANEL];
        for (int q = 0; q < np; q += 2) {
            if (mr == 1) tile_avx2<1, 2, BF16>(w, x, ldx, m0, p0 + q, sub);
            else if (mr == 2) tile_avx2<2, 2, BF16>(w, x, ldx, m0, p0 + q, sub);
            else tile_avx2<3, 2, BF16>(w, x, ldx, m0, p0 + q, sub);
            for (int r = 0; r < mr; ++r) std::memcpy(tile + r * width + q * PANEL, sub + r * 2 * PANEL, sizeof(float) * 2 * PANEL);
        }
        return;
    }
    float sub[6 * PANEL];
    for (int q = 0; q < np; ++q) {
        switch (mr) {
            case 1: tile_avx2<1, 1, BF16>(w, x, ldx, m0, p0 + q, sub); break;
            case 2: tile_avx2<2, 1, BF16>(w, x, ldx, m0, p0 + q, sub); break;
            case 3: tile_avx2<3, 1, BF16>(w, x, ldx, m0, p0 + q, sub); break;
            case 4: tile_avx2<4, 1, BF16>(w, x, ldx, m0, p0 + q, sub); break;
            case 5: tile_avx2<5, 1, BF16>(w, x, ldx, m0, p0 + q, sub); break;
            default: tile_avx2<6, 1, BF16>(w, x, ldx, m0, p0 + q, sub); break;
        }
        for (int r = 0; r < mr; ++r) std::memcpy(tile + r * width + q * PANEL, sub + r * PANEL, sizeof(float) * PANEL);
    }
}
#endif

constexpr int GROUP = 4;      // panels per task (64 output columns)
constexpr int64_t MC = 192;   // rows per task: the x block a task reuses stays in L2
constexpr int MB = 6;         // rows per micro-kernel call

}  // namespace

PackedWeight pack_weight(const torch::Tensor& weight, bool bf16) {
    TORCH_CHECK(weight.dim() == 2, "pack_weight: weight must be [N, K], got ", weight.sizes());
    auto w = weight.detach().to(torch::kCPU, torch::kFloat32).contiguous();
    const int64_t N = w.size(0), K = w.size(1);
    const int64_t P = (N + PANEL - 1) / PANEL;
    PackedWeight out;
    out.N = N;
    out.K = K;
    out.bf16 = bf16;
    const float* src = w.data_ptr<float>();
    if (bf16) {
        auto rounded = w.to(torch::kBFloat16).contiguous();
        TORCH_CHECK(torch::equal(rounded.to(torch::kFloat32), w), "pack_weight: bf16 packing needs weights that bf16 holds exactly");
        out.data = torch::zeros({P, K, PANEL}, torch::kBFloat16);
        const uint16_t* r = reinterpret_cast<const uint16_t*>(rounded.data_ptr<at::BFloat16>());
        uint16_t* dst = reinterpret_cast<uint16_t*>(out.data.data_ptr<at::BFloat16>());
        for (int64_t p = 0; p < P; ++p)
            for (int64_t k = 0; k < K; ++k)
                for (int s = 0; s < PANEL; ++s) {
                    int64_t n = p * PANEL + BF16_ORDER[s];
                    dst[(p * K + k) * PANEL + s] = n < N ? r[n * K + k] : 0;
                }
    } else {
        out.data = torch::zeros({P, K, PANEL}, torch::kFloat32);
        float* dst = out.data.data_ptr<float>();
        for (int64_t p = 0; p < P; ++p)
            for (int64_t k = 0; k < K; ++k)
                for (int s = 0; s < PANEL; ++s) {
                    int64_t n = p * PANEL + s;
                    dst[(p * K + k) * PANEL + s] = n < N ? src[n * K + k] : 0.0f;
                }
    }
    return out;
}

void linear_into(const PackedWeight& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, const float* residual,
                 int64_t ldr) {
    const int64_t P = (w.N + PANEL - 1) / PANEL;
    const int64_t groups = (P + GROUP - 1) / GROUP;
    const int64_t chunks = (M + MC - 1) / MC;
    const int64_t tasks = groups * chunks;
    // below ~64k multiply-adds per thread the fork/join costs more than it saves
    const int64_t macs_per_task = std::min<int64_t>(M, MC) * GROUP * PANEL * w.K;
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, macs_per_task));
    const bool avx2 = use_avx2();
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
        float tile[MB * GROUP * PANEL];
        for (int64_t t = begin; t < end; ++t) {
            const int64_t chunk = t / groups, g = t % groups;
            const int64_t p0 = g * GROUP;
            const int np = static_cast<int>(std::min<int64_t>(GROUP, P - p0));
            const int64_t m_end = std::min(M, (chunk + 1) * MC);
            for (int64_t m0 = chunk * MC; m0 < m_end; m0 += MB) {
                const int mr = static_cast<int>(std::min<int64_t>(MB, m_end - m0));
#if CHIAR_X86
                if (avx2 && w.bf16) tile_dispatch<true>(w, x, ldx, m0, mr, p0, np, tile);
                else if (avx2) tile_dispatch<false>(w, x, ldx, m0, mr, p0, np, tile);
                else tile_scalar(w, x, ldx, m0, mr, p0, np, tile);
#else
                (void)avx2;
                tile_scalar(w, x, ldx, m0, mr, p0, np, tile);
#endif
                const int width = np * PANEL;
                const int64_t n0 = p0 * PANEL;
                const int cols = static_cast<int>(std::min<int64_t>(width, w.N - n0));
                for (int r = 0; r < mr; ++r) {
                    float* out = y + (m0 + r) * ldy + n0;
                    const float* acc = tile + r * width;
                    if (residual != nullptr) {
                        const float* res = residual + (m0 + r) * ldr + n0;
                        for (int c = 0; c < cols; ++c) out[c] = res[c] + acc[c];
                    } else {
                        std::memcpy(out, acc, sizeof(float) * cols);
                    }
                }
            }
        }
    });
}

void swiglu_into(const float* h, int64_t M, int64_t F, float* out) {
    // out[m, j] = silu(h[m, j]) * h[m, F + j]
    const bool avx2 = use_avx2();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            const float* gate = h + m * 2 * F;
            const float* up = gate + F;
            float* o = out + m * F;
            int64_t j = 0;
#if CHIAR_X86
            if (avx2)
                for (; j + LANES <= F; j += LANES) swiglu8_avx2(gate + j, up + j, o + j);
#else
            (void)avx2;
#endif
            for (; j < F; ++j) o[j] = silu_scalar(gate[j]) * up[j];
        }
    });
}

#if CHIAR_X86
CHIAR_AVX2 void swiglu8_avx2(const float* gate, const float* up, float* out) {
    _mm256_storeu_ps(out, _mm256_mul_ps(silu_avx2(_mm256_loadu_ps(gate)), _mm256_loadu_ps(up)));
}
#endif

}  // namespace chiar
