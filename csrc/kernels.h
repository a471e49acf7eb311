// The native CPU kernels of CHIAR-Former's inference step (bound to Python in bindings.cpp).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

#include "simd.h"

namespace chiar {

// Whether the AVX2 paths run (the CPU has AVX2+FMA and `set_scalar(true)` was not called).
bool use_avx2();
void set_scalar(bool scalar);

// ---------------------------------------------------------------- linear.cpp
struct PackedWeight {
    torch::Tensor data;  // [P, K, 16] float32 or bfloat16 panels
    int64_t N = 0;
    int64_t K = 0;
    bool bf16 = false;
};

PackedWeight pack_weight(const torch::Tensor& weight, bool bf16);
// y[m, :] = (residual[m, :] +) x[m, :] @ W^T for m < M; strides in floats.
void linear_into(const PackedWeight& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, const float* residual,
                 int64_t ldr);
// out[m, j] = silu(h[m, j]) * h[m, F + j]
void swiglu_into(const float* h, int64_t M, int64_t F, float* out);
#if CHIAR_X86
CHIAR_AVX2 void swiglu8_avx2(const float* gate, const float* up, float* out);
#endif

// ---------------------------------------------------------------- spectral.cpp
// y = x / sqrt(mean(x^2) + eps) * w, per row
void rms_norm_into(const float* x, int64_t M, int64_t d, int64_t ldx, const float* w, float eps, float* y);
// normalised spectral entropy of each row of DCT coefficients
void entropy_into(const float* coef, int64_t M, int64_t d, float eps, float* out);
// MetaRouter gate of flat tokens: running sums per cache row (updated in place), causal mean, sigmoid(w . mean + b)
void gate_into(const float* x, const int64_t* rows, const int64_t* positions, int64_t n, int64_t d, float* embed_sum,
               const float* w, float b, float* gate);

// ---------------------------------------------------------------- sampling.cpp
// out[r] = the token of row r (-1: its logits give no distribution)
void sample_rows(const float* logits, int64_t rows, int64_t vocab, const float* temperature, const int64_t* top_k, const float* top_p,
                 const float* uniform, int64_t* out);
#if CHIAR_X86
CHIAR_AVX2 void exp8_shifted_avx2(float* v, float shift, float keep_from);
CHIAR_AVX2 void divide8_avx2(const float* v, float t, float* e);
CHIAR_AVX2 float block_sum_avx2(const float* v, int64_t n);
CHIAR_AVX2 void buckets8_avx2(const float* e, int64_t n, float floor, int32_t* bucket);
CHIAR_AVX2 void members8_avx2(const int32_t* bucket, int64_t n, int32_t b, std::vector<int64_t>& members);
CHIAR_AVX2 void kept_block_sums_avx2(float* e, int64_t n, float threshold, float* blocks);
CHIAR_AVX2 bool finite_range_avx2(const float* v, int64_t n, float& low, float& top);
#endif

// ---------------------------------------------------------------- attention.cpp
struct PagedCache {
    torch::Tensor keys;       // [blocks, H, B, hd]
    torch::Tensor values;     // [blocks, H, B, hd]
    torch::Tensor tables;     // [rows, layers, max_blocks] int32
    torch::Tensor lengths;    // [rows, layers] int32: entries held per (row, layer)
    torch::Tensor free_stack; // [blocks] int32: free block ids in [0, free_top)
    torch::Tensor free_top;   // [1] int64
};

// Append the roped K/V of flat tokens (qkv [n, 3 H hd]) to their rows' caches in `layer`, then
// attend each token's query causally over its row's cache; y [n, H hd]. keys_seen[i] = entries token i attended.
void attend(const torch::Tensor& qkv, const torch::Tensor& rows, const torch::Tensor& positions, int64_t layer, PagedCache& cache,
            const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& y, torch::Tensor& keys_seen);

// ---------------------------------------------------------------- ops.cpp: the tensor-level ops (checked, allocating)
// The orthonormal DCT-II of width d = 2h through its even/odd split: C[k][d-1-n] = (-1)^k C[k][n], so the
// even coefficients are E s and the odd ones O a, with s[n] = x[n] + x[d-1-n] and a[n] = x[n] - x[d-1-n]
// (n < h): two h x h matrices read instead of one d x d, half the bytes and half the multiply-adds.
struct SplitDct {
    PackedWeight even, odd;      // E[j][n] = C[2j][n], O[j][n] = C[2j+1][n]
    PackedWeight even_t, odd_t;  // E^T and O^T: the inverse
};
// coefficients [M, d] of the rows of u
torch::Tensor dct_split(const torch::Tensor& u, const SplitDct& dct);
// residual + IDCT(filter * coefficients), per row
torch::Tensor idct_split(const torch::Tensor& coef, const torch::Tensor& filter, const SplitDct& dct, const torch::Tensor& residual);
torch::Tensor linear(const torch::Tensor& x, const PackedWeight& w, const std::optional<torch::Tensor>& residual);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor ffn(const torch::Tensor& x, const torch::Tensor& norm_weight, double eps, const PackedWeight& w_in,
                  const PackedWeight& w_out);
std::tuple<torch::Tensor, std::vector<int64_t>> route(const torch::Tensor& u, const SplitDct& dct, double eps, double tau,
                                                      torch::Tensor& entropy, torch::Tensor& op, int64_t dct_id,
                                                      int64_t attention_id, int64_t n_ids);
torch::Tensor gate(const torch::Tensor& x, const torch::Tensor& rows, const torch::Tensor& positions, torch::Tensor& embed_sum,
                   const torch::Tensor& weight, double bias);
std::tuple<torch::Tensor, torch::Tensor> attend_py(const torch::Tensor& qkv, const torch::Tensor& rows, const torch::Tensor& positions,
                                                   int64_t layer, torch::Tensor keys, torch::Tensor values, torch::Tensor tables,
                                                   torch::Tensor lengths, torch::Tensor free_stack, torch::Tensor free_top,
                                                   const torch::Tensor& cos, const torch::Tensor& sin);
torch::Tensor sample(const torch::Tensor& logits, const torch::Tensor& temperature, const torch::Tensor& top_k,
                     const torch::Tensor& top_p, const torch::Tensor& uniform);

// ---------------------------------------------------------------- step.cpp: a whole forward in one call
// One layer of a native model: kind 0 = layer 1's gated DCT, 1 = routed DCT / attention (entropy >= tau:
// attention), 2 = attention. Tensors are the model's own parameters (shared storage).
struct StepLayer {
    int64_t kind = 0;
    torch::Tensor mixer_norm, ffn_norm, filter;  // filter: the DCT layers' spectral filter [d]
    double mixer_eps = 0, ffn_eps = 0, tau = 0;
    PackedWeight w_in, w_out, qkv, out;  // qkv / out: the attending layers'
};

struct StepModel {
    std::vector<StepLayer> layers;
    torch::Tensor embed, final_norm, gate_weight;  // gate_weight undefined: no MetaRouter (layer 1 always mixes)
    double final_eps = 0, gate_bias = 0, entropy_eps = 0;
    PackedWeight lm_head;
    SplitDct dct;
};

// The cache a step extends (PagedCache) and reads (embed_sum, rotary tables).
struct StepCache {
    PagedCache pool;
    torch::Tensor embed_sum, cos, sin;
};

struct StepResult {
    torch::Tensor logits;       // [R, V] at logits_at (every token when undefined)
    torch::Tensor operator_ids; // [L, n] int8
    torch::Tensor entropy;      // [L, n] float32, NaN where a layer computes none
    torch::Tensor keys_seen;    // [L, n] int32
    std::optional<torch::Tensor> gate;  // [n]
    torch::Tensor counts;       // [L, 4] int64: tokens per layer and operator id
    torch::Tensor span_counts;  // [S, L, 4] int64: the same per span of `span_lengths`
};

StepResult model_step(const StepModel& model, const torch::Tensor& tokens, const torch::Tensor& rows, const torch::Tensor& positions,
                      const std::optional<torch::Tensor>& logits_at, const std::vector<int64_t>& span_lengths, StepCache& cache);

}  // namespace chiar
