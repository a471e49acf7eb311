// The tensor-level ops the Python kernels (model/kernels.py) and the whole-forward step (step.cpp)
// call: shape checks, output allocation, then the raw kernels of linear.cpp, spectral.cpp,
// attention.cpp and sampling.cpp.
#include <cmath>
#include <optional>

#include "kernels.h"

namespace chiar {

namespace {
void check_rows(const torch::Tensor& x, int64_t width, const char* name) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, name, ": expected a float32 CPU tensor, got ",
                x.scalar_type(), " on ", x.device());
    TORCH_CHECK(x.dim() == 2 && x.size(1) == width, name, ": expected [n, ", width, "], got ", x.sizes());
    TORCH_CHECK(x.stride(1) == 1, name, ": the last axis must be contiguous");
}
}  // namespace

torch::Tensor linear(const torch::Tensor& x, const PackedWeight& w, const std::optional<torch::Tensor>& residual) {
    check_rows(x, w.K, "linear: x");
    auto y = torch::empty({x.size(0), w.N}, x.options());
    const float* r = nullptr;
    int64_t ldr = 0;
    if (residual.has_value()) {
        check_rows(*residual, w.N, "linear: residual");
        TORCH_CHECK(residual->size(0) == x.size(0), "linear: residual rows ", residual->size(0), " != ", x.size(0));
        r = residual->data_ptr<float>();
        ldr = residual->stride(0);
    }
    linear_into(w, x.data_ptr<float>(), x.size(0), x.stride(0), y.data_ptr<float>(), w.N, r, ldr);
    return y;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
    const int64_t d = weight.size(0);
    check_rows(x, d, "rms_norm: x");
    auto w = weight.contiguous();
    auto y = torch::empty({x.size(0), d}, x.options());
    rms_norm_into(x.data_ptr<float>(), x.size(0), d, x.stride(0), w.data_ptr<float>(), static_cast<float>(eps), y.data_ptr<float>());
    return y;
}

// x + W_out(silu(g) * u) with [g, u] = W_in(rms_norm(x)): the whole feed-forward half of a block
torch::Tensor ffn(const torch::Tensor& x, const torch::Tensor& norm_weight, double eps, const PackedWeight& w_in,
                  const PackedWeight& w_out) {
    const int64_t d = norm_weight.size(0), M = x.size(0), F = w_out.K;
    check_rows(x, d, "ffn: x");
    TORCH_CHECK(w_in.K == d && w_in.N == 2 * F && w_out.N == d, "ffn: weight shapes do not fit");
    auto u = torch::empty({M, d}, x.options());
    auto h = torch::empty({M, 2 * F}, x.options());
    auto a = torch::empty({M, F}, x.options());
    auto y = torch::empty({M, d}, x.options());
    auto w = norm_weight.contiguous();
    rms_norm_into(x.data_ptr<float>(), M, d, x.stride(0), w.data_ptr<float>(), static_cast<float>(eps), u.data_ptr<float>());
    linear_into(w_in, u.data_ptr<float>(), M, d, h.data_ptr<float>(), 2 * F, nullptr, 0);
    swiglu_into(h.data_ptr<float>(), M, F, a.data_ptr<float>());
    linear_into(w_out, a.data_ptr<float>(), M, F, y.data_ptr<float>(), d, x.data_ptr<float>(), x.stride(0));
    return y;
}

torch::Tensor dct_split(const torch::Tensor& u, const SplitDct& t) {
    const int64_t M = u.size(0), h = t.even.K, d = 2 * h;
    TORCH_CHECK(t.even.N == h && t.odd.N == h && t.odd.K == h, "dct: the split matrices must be [d/2, d/2]");
    check_rows(u, d, "dct: u");
    auto buf = torch::empty({4, M, h}, u.options());  // s, a, then E s, O a
    float* s = buf.data_ptr<float>();
    float* a = s + M * h;
    float* e = a + M * h;
    float* o = e + M * h;
    const float* x = u.data_ptr<float>();
    const int64_t ldx = u.stride(0);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < h; ++n) {
            const float lo = x[m * ldx + n], hi = x[m * ldx + d - 1 - n];
            s[m * h + n] = lo + hi;
            a[m * h + n] = lo - hi;
        }
    linear_into(t.even, s, M, h, e, h, nullptr, 0);
    linear_into(t.odd, a, M, h, o, h, nullptr, 0);
    auto coef = torch::empty({M, d}, u.options());
    float* c = coef.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < h; ++j) {
            c[m * d + 2 * j] = e[m * h + j];
            c[m * d + 2 * j + 1] = o[m * h + j];
        }
    return coef;
}

torch::Tensor idct_split(const torch::Tensor& coef, const torch::Tensor& filter, const SplitDct& t, const torch::Tensor& residual) {
    const int64_t M = coef.size(0), h = t.even_t.K, d = 2 * h;
    TORCH_CHECK(t.even_t.N == h && t.odd_t.N == h && t.odd_t.K == h, "idct: the split matrices must be [d/2, d/2]");
    check_rows(coef, d, "idct: coefficients");
    check_rows(residual, d, "idct: residual");
    TORCH_CHECK(residual.size(0) == M, "idct: residual rows ", residual.size(0), " != ", M);
    TORCH_CHECK(filter.numel() == d && filter.scalar_type() == torch::kFloat32, "idct: filter must be float32 [", d, "]");
    auto w = filter.contiguous();
    const float* f = w.data_ptr<float>();
    auto buf = torch::empty({4, M, h}, coef.options());  // filtered even and odd coefficients, then E^T ce, O^T co
    float* ce = buf.data_ptr<float>();
    float* co = ce + M * h;
    float* e = co + M * h;
    float* o = e + M * h;
    const float* c = coef.data_ptr<float>();
    const int64_t ldc = coef.stride(0);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < h; ++j) {
            ce[m * h + j] = c[m * ldc + 2 * j] * f[2 * j];
            co[m * h + j] = c[m * ldc + 2 * j + 1] * f[2 * j + 1];
        }
    linear_into(t.even_t, ce, M, h, e, h, nullptr, 0);
    linear_into(t.odd_t, co, M, h, o, h, nullptr, 0);
    auto y = torch::empty({M, d}, coef.options());
    float* out = y.data_ptr<float>();
    const float* r = residual.data_ptr<float>();
    const int64_t ldr = residual.stride(0);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < h; ++n) {
            out[m * d + n] = r[m * ldr + n] + (e[m * h + n] + o[m * h + n]);
            out[m * d + d - 1 - n] = r[m * ldr + d - 1 - n] + (e[m * h + n] - o[m * h + n]);
        }
    return y;
}

// DCT coefficients and spectral entropy of u; with a finite tau also the decision (attention id where
// entropy >= tau, else dct id) into `op` and the count per operator id.
std::tuple<torch::Tensor, std::vector<int64_t>> route(const torch::Tensor& u, const SplitDct& dct, double eps, double tau,
                                                      torch::Tensor& entropy, torch::Tensor& op, int64_t dct_id,
                                                      int64_t attention_id, int64_t n_ids) {
    const int64_t M = u.size(0);
    TORCH_CHECK(entropy.is_contiguous() && entropy.numel() == M && entropy.scalar_type() == torch::kFloat32, "route: entropy out");
    auto coef = dct_split(u, dct);
    entropy_into(coef.data_ptr<float>(), M, coef.size(1), static_cast<float>(eps), entropy.data_ptr<float>());
    std::vector<int64_t> counts(n_ids, 0);
    if (std::isfinite(tau)) {
        TORCH_CHECK(op.is_contiguous() && op.numel() == M && op.scalar_type() == torch::kInt8, "route: op out");
        const float t = static_cast<float>(tau);
        const float* e = entropy.data_ptr<float>();
        int8_t* o = op.data_ptr<int8_t>();
        for (int64_t m = 0; m < M; ++m) {
            o[m] = static_cast<int8_t>(e[m] >= t ? attention_id : dct_id);
            counts[o[m]] += 1;
        }
    }
    return {coef, counts};
}

torch::Tensor gate(const torch::Tensor& x, const torch::Tensor& rows, const torch::Tensor& positions, torch::Tensor& embed_sum,
                   const torch::Tensor& weight, double bias) {
    const int64_t d = weight.size(0), n = x.size(0);
    check_rows(x, d, "gate: x");
    TORCH_CHECK(x.is_contiguous() && embed_sum.is_contiguous() && embed_sum.size(1) == d, "gate: contiguous [n, d] inputs");
    TORCH_CHECK(rows.scalar_type() == torch::kInt64 && positions.scalar_type() == torch::kInt64, "gate: int64 rows/positions");
    auto w = weight.contiguous();
    auto g = torch::empty({n}, x.options());
    gate_into(x.data_ptr<float>(), rows.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), n, d, embed_sum.data_ptr<float>(),
              w.data_ptr<float>(), static_cast<float>(bias), g.data_ptr<float>());
    return g;
}

std::tuple<torch::Tensor, torch::Tensor> attend_py(const torch::Tensor& qkv, const torch::Tensor& rows, const torch::Tensor& positions,
                                                   int64_t layer, torch::Tensor keys, torch::Tensor values, torch::Tensor tables,
                                                   torch::Tensor lengths, torch::Tensor free_stack, torch::Tensor free_top,
                                                   const torch::Tensor& cos, const torch::Tensor& sin) {
    TORCH_CHECK(qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat32, "attend: qkv must be contiguous float32");
    TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.scalar_type() == torch::kFloat32, "attend: pool");
    TORCH_CHECK(tables.is_contiguous() && tables.scalar_type() == torch::kInt32, "attend: tables must be contiguous int32");
    TORCH_CHECK(lengths.is_contiguous() && lengths.scalar_type() == torch::kInt32, "attend: lengths must be contiguous int32");
    TORCH_CHECK(free_stack.scalar_type() == torch::kInt32 && free_top.scalar_type() == torch::kInt64, "attend: free stack");
    TORCH_CHECK(rows.scalar_type() == torch::kInt64 && positions.scalar_type() == torch::kInt64, "attend: int64 rows/positions");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == keys.size(3), "attend: rotary tables");
    const int64_t n = qkv.size(0);
    auto y = torch::empty({n, keys.size(1) * keys.size(3)}, qkv.options());
    auto seen = torch::empty({n}, torch::kInt32);
    PagedCache cache{keys, values, tables, lengths, free_stack, free_top};
    attend(qkv, rows, positions, layer, cache, cos, sin, y, seen);
    return {y, seen};
}

torch::Tensor sample(const torch::Tensor& logits, const torch::Tensor& temperature, const torch::Tensor& top_k,
                     const torch::Tensor& top_p, const torch::Tensor& uniform) {
    TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == torch::kFloat32 && logits.device().is_cpu(),
                "sample: logits must be a contiguous float32 CPU tensor [rows, vocab]");
    const int64_t rows = logits.size(0);
    auto f32 = [rows](const torch::Tensor& t, const char* name) {
        TORCH_CHECK(t.numel() == rows && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), "sample: ", name, " must be float32 [rows]");
        return t.data_ptr<float>();
    };
    TORCH_CHECK(top_k.numel() == rows && top_k.scalar_type() == torch::kInt64 && top_k.is_contiguous(), "sample: top_k must be int64 [rows]");
    auto out = torch::empty({rows}, torch::kInt64);
    sample_rows(logits.data_ptr<float>(), rows, logits.size(1), f32(temperature, "temperature"), top_k.data_ptr<int64_t>(),
                f32(top_p, "top_p"), f32(uniform, "uniform"), out.data_ptr<int64_t>());
    return out;
}

}  // namespace chiar
