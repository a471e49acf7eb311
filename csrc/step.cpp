// A whole inference forward in one native call: the tensor-level ops of ops.cpp, in the order and on
// the operands of ChiarLM's per-layer path with the native kernels (model/blocks.py `mix_step`,
// model/kernels.py `NativeKernels`), so every bit it returns is that path's. What it saves is the
// Python between the ops (~0.6 ms of a 1.5 ms batch-1 forward) and the ~30 GIL hand-offs a step
// made, one per op: the HTTP thread took the GIL at each and the engine waited to get it back.
#include <cmath>

#include "kernels.h"

namespace chiar {

namespace {

constexpr int64_t IDENTITY = 0, DCT = 1, ATTENTION = 3, N_OPS = 4;  // model/operators.py
constexpr int64_t GATED = 0, ROUTED = 1;                            // StepLayer::kind; 2: attention
constexpr double GATE_OPEN = 0.5;                                   // model/routing.py

struct Tokens {
    torch::Tensor rows, positions;  // [n] int64: each token's cache row and position
};

// residual + DCT mixing of tokens whose coefficients are given: IDCT(filter * c), one matmul
torch::Tensor dct_mix(const StepModel& m, const StepLayer& l, const torch::Tensor& coefficients, const torch::Tensor& residual) {
    return idct_split(coefficients, l.filter, m.dct, residual);
}

// residual + attention of u (appended to its rows' caches first); the entries each token attended
std::tuple<torch::Tensor, torch::Tensor> attention(const StepLayer& l, int64_t layer, const torch::Tensor& u, const torch::Tensor& residual,
                                                   const Tokens& t, StepCache& c) {
    auto qkv = linear(u, l.qkv, std::nullopt);
    auto [y, seen] = attend_py(qkv, t.rows, t.positions, layer, c.pool.keys, c.pool.values, c.pool.tables, c.pool.lengths,
                               c.pool.free_stack, c.pool.free_top, c.cos, c.sin);
    return {linear(y, l.out, residual), seen};
}

// Layer 1: DCT mixing where the gate is open, the token unmixed where it is closed.
torch::Tensor gated_layer(const StepModel& m, const StepLayer& l, const torch::Tensor& u, const torch::Tensor& x,
                          const std::optional<torch::Tensor>& gate_values, torch::Tensor op, int64_t* counts) {
    const int64_t n = x.size(0);
    auto mix = [&](const torch::Tensor& uu, const torch::Tensor& xx) { return dct_mix(m, l, dct_split(uu, m.dct), xx); };
    if (!gate_values.has_value()) {
        op.fill_(DCT);
        counts[DCT] = n;
        return mix(u, x);
    }
    auto is_open = gate_values->ge(GATE_OPEN);
    op.copy_(torch::where(is_open, torch::scalar_tensor(DCT, torch::kInt8), torch::scalar_tensor(IDENTITY, torch::kInt8)));
    auto sel = is_open.nonzero().squeeze(1);
    counts[DCT] = sel.numel();
    counts[IDENTITY] = n - sel.numel();
    if (sel.numel() == n) return mix(u, x);
    auto y = x + u;
    if (sel.numel()) y.index_copy_(0, sel, mix(u.index_select(0, sel), x.index_select(0, sel)));
    return y;
}

// Layers 2..L-1: each token to DCT or attention by its spectral entropy.
torch::Tensor routed_layer(const StepModel& m, const StepLayer& l, int64_t layer, const torch::Tensor& u, const torch::Tensor& x,
                           const Tokens& t, StepCache& c, torch::Tensor entropy, torch::Tensor op, torch::Tensor seen, int64_t* counts) {
    auto [coefficients, sizes] = route(u, m.dct, m.entropy_eps, l.tau, entropy, op, DCT, ATTENTION, N_OPS);
    const int64_t n = x.size(0);
    for (int64_t k = 0; k < N_OPS; ++k) counts[k] = sizes[k];
    if (sizes[DCT] == n) return dct_mix(m, l, coefficients, x);
    if (sizes[ATTENTION] == n) {
        auto [y, s] = attention(l, layer, u, x, t, c);
        seen.copy_(s);
        return y;
    }
    // tokens grouped by operator id; stable, so each group keeps flat order (a row's tokens stay in order)
    auto order = torch::argsort(op, /*stable=*/true, 0, false);
    auto y = torch::empty_like(x);
    auto dct_sel = order.slice(0, sizes[IDENTITY], sizes[IDENTITY] + sizes[DCT]);
    y.index_copy_(0, dct_sel, dct_mix(m, l, coefficients.index_select(0, dct_sel), x.index_select(0, dct_sel)));
    auto att_sel = order.slice(0, n - sizes[ATTENTION], n);
    Tokens picked{t.rows.index_select(0, att_sel), t.positions.index_select(0, att_sel)};
    auto [out, s] = attention(l, layer, u.index_select(0, att_sel), x.index_select(0, att_sel), picked, c);
    y.index_copy_(0, att_sel, out);
    seen.index_copy_(0, att_sel, s);
    return y;
}

}  // namespace

StepResult model_step(const StepModel& m, const torch::Tensor& tokens, const torch::Tensor& rows, const torch::Tensor& positions,
                      const std::optional<torch::Tensor>& logits_at, const std::vector<int64_t>& span_lengths, StepCache& c) {
    at::NoGradGuard no_grad;
    const int64_t n = tokens.numel(), L = static_cast<int64_t>(m.layers.size());
    TORCH_CHECK(n > 0, "step: no tokens");
    TORCH_CHECK(rows.numel() == n && positions.numel() == n, "step: rows and positions must have one entry per token");
    int64_t spanned = 0;
    for (int64_t k : span_lengths) spanned += k;
    TORCH_CHECK(spanned == n, "step: spans cover ", spanned, " tokens, the batch has ", n);
    const Tokens t{rows, positions};
    auto x = torch::embedding(m.embed, tokens);
    std::optional<torch::Tensor> g;
    if (m.gate_weight.defined()) g = gate(x, rows, positions, c.embed_sum, m.gate_weight, m.gate_bias);
    StepResult r;
    r.operator_ids = torch::empty({L, n}, torch::kInt8);
    r.entropy = torch::full({L, n}, NAN, torch::kFloat32);
    r.keys_seen = torch::zeros({L, n}, torch::kInt32);
    r.counts = torch::zeros({L, N_OPS}, torch::kInt64);
    int64_t* counts = r.counts.data_ptr<int64_t>();
    for (int64_t layer = 0; layer < L; ++layer) {
        const StepLayer& l = m.layers[layer];
        auto u = rms_norm(x, l.mixer_norm, l.mixer_eps);
        auto op = r.operator_ids[layer];
        int64_t* lc = counts + layer * N_OPS;
        if (l.kind == GATED) {
            x = gated_layer(m, l, u, x, g, op, lc);
        } else if (l.kind == ROUTED) {
            x = routed_layer(m, l, layer, u, x, t, c, r.entropy[layer], op, r.keys_seen[layer], lc);
        } else {
            op.fill_(ATTENTION);
            lc[ATTENTION] = n;
            auto [y, s] = attention(l, layer, u, x, t, c);
            r.keys_seen[layer].copy_(s);
            x = y;
        }
        x = ffn(x, l.ffn_norm, l.ffn_eps, l.w_in, l.w_out);
    }
    auto h = logits_at.has_value() ? x.index_select(0, *logits_at) : x;
    r.logits = h.size(0) ? linear(rms_norm(h, m.final_norm, m.final_eps), m.lm_head, std::nullopt)
                         : torch::zeros({0, m.lm_head.N}, x.options());
    r.gate = g;
    // tokens per (span, layer, operator id): what the cache's host mirror and the cost accounting read
    const int64_t S = static_cast<int64_t>(span_lengths.size());
    r.span_counts = torch::zeros({S, L, N_OPS}, torch::kInt64);
    int64_t* sc = r.span_counts.data_ptr<int64_t>();
    const int8_t* ids = r.operator_ids.data_ptr<int8_t>();
    for (int64_t s = 0, start = 0; s < S; start += span_lengths[s], ++s)
        for (int64_t layer = 0; layer < L; ++layer)
            for (int64_t i = start; i < start + span_lengths[s]; ++i) sc[(s * L + layer) * N_OPS + ids[layer * n + i]] += 1;
    return r;
}

}  // namespace chiar
