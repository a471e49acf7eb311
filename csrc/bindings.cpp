// Python bindings of the native kernels (module model._native). Every call releases the GIL while
// it computes, so the HTTP thread keeps running during a forward.
#include <torch/extension.h>

#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace chiar {

namespace {
std::atomic<bool> force_scalar{false};
}  // namespace

bool cpu_has_avx2() {
#if CHIAR_X86
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has;
#else
    return false;
#endif
}

bool use_avx2() { return cpu_has_avx2() && !force_scalar.load(std::memory_order_relaxed); }
void set_scalar(bool scalar) { force_scalar.store(scalar); }

void add_step_layer(StepModel& m, int64_t kind, const torch::Tensor& mixer_norm, double mixer_eps, const torch::Tensor& ffn_norm,
                    double ffn_eps, const PackedWeight& w_in, const PackedWeight& w_out, const std::optional<PackedWeight>& qkv,
                    const std::optional<PackedWeight>& out, const std::optional<torch::Tensor>& filter, double tau) {
    TORCH_CHECK(kind >= 0 && kind <= 2, "add_layer: kind must be 0 (gated DCT), 1 (routed) or 2 (attention), got ", kind);
    TORCH_CHECK(kind == 0 || (qkv.has_value() && out.has_value()), "add_layer: an attending layer needs qkv and out");
    TORCH_CHECK(kind == 2 || filter.has_value(), "add_layer: a DCT layer needs its filter");
    StepLayer l;
    l.kind = kind;
    l.mixer_norm = mixer_norm.contiguous();
    l.ffn_norm = ffn_norm.contiguous();
    l.mixer_eps = mixer_eps;
    l.ffn_eps = ffn_eps;
    l.w_in = w_in;
    l.w_out = w_out;
    if (qkv.has_value()) l.qkv = *qkv;
    if (out.has_value()) l.out = *out;
    if (filter.has_value()) l.filter = *filter;
    l.tau = tau;
    m.layers.push_back(l);
}

void set_step_head(StepModel& m, const torch::Tensor& embed, const torch::Tensor& final_norm, double final_eps, const PackedWeight& lm_head,
                   const SplitDct& dct, const std::optional<torch::Tensor>& gate_weight, double gate_bias, double entropy_eps) {
    m.embed = embed;
    m.final_norm = final_norm.contiguous();
    m.final_eps = final_eps;
    m.lm_head = lm_head;
    m.dct = dct;
    m.gate_weight = gate_weight.has_value() ? gate_weight->contiguous() : torch::Tensor();
    m.gate_bias = gate_bias;
    m.entropy_eps = entropy_eps;
}

using StepTuple = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, std::optional<torch::Tensor>, torch::Tensor,
                             torch::Tensor>;

StepTuple step_py(const StepModel& m, const torch::Tensor& tokens, const torch::Tensor& rows, const torch::Tensor& positions,
                  const std::optional<torch::Tensor>& logits_at, const std::vector<int64_t>& span_lengths, torch::Tensor keys,
                  torch::Tensor values, torch::Tensor tables, torch::Tensor lengths, torch::Tensor free_stack, torch::Tensor free_top,
                  torch::Tensor embed_sum, const torch::Tensor& cos, const torch::Tensor& sin) {
    TORCH_CHECK(!m.layers.empty() && m.embed.defined(), "step: the model has no layers or no head (add_layer, set_head)");
    StepCache c{PagedCache{keys, values, tables, lengths, free_stack, free_top}, embed_sum, cos, sin};
    auto r = model_step(m, tokens, rows, positions, logits_at, span_lengths, c);
    return {r.logits, r.operator_ids, r.entropy, r.keys_seen, r.gate, r.counts, r.span_counts};
}

}  // namespace chiar

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    namespace py = pybind11;
    using namespace chiar;
    m.doc() = "CHIAR-Former native CPU kernels (batch-invariant, AVX2 with a bitwise-equal scalar path)";
    py::class_<PackedWeight>(m, "PackedWeight")
        .def_readonly("data", &PackedWeight::data)
        .def_readonly("out_features", &PackedWeight::N)
        .def_readonly("in_features", &PackedWeight::K)
        .def_readonly("bf16", &PackedWeight::bf16);
    auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("pack", &pack_weight, "pack a [N, K] weight into 16-column panels", py::arg("weight"), py::arg("bf16"), nogil);
    py::class_<SplitDct>(m, "SplitDct", "the DCT-II through its even/odd split: E, O and their transposes, each [d/2, d/2]")
        .def(py::init([](const PackedWeight& even, const PackedWeight& odd, const PackedWeight& even_t, const PackedWeight& odd_t) {
                 return SplitDct{even, odd, even_t, odd_t};
             }),
             py::arg("even"), py::arg("odd"), py::arg("even_t"), py::arg("odd_t"));
    m.def("dct", &dct_split, "DCT-II coefficients of each row", py::arg("u"), py::arg("dct"), nogil);
    m.def("idct", &idct_split, "residual + IDCT(filter * coefficients) of each row", py::arg("coefficients"), py::arg("filter"),
          py::arg("dct"), py::arg("residual"), nogil);
    m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("residual") = std::nullopt, nogil);
    m.def("rms_norm", &rms_norm, nogil);
    m.def("ffn", &ffn, nogil);
    m.def("route", &route, nogil);
    m.def("gate", &gate, nogil);
    m.def("attend", &attend_py, nogil);
    m.def("sample", &sample, "one token per row: temperature (0: greedy), top-k (0: off), top-p, uniform draw", nogil);
    py::class_<StepModel>(m, "StepModel", "a native model's weights for `step`: the whole forward in one call")
        .def(py::init<>())
        .def("add_layer", &add_step_layer, py::arg("kind"), py::arg("mixer_norm"), py::arg("mixer_eps"), py::arg("ffn_norm"),
             py::arg("ffn_eps"), py::arg("w_in"), py::arg("w_out"), py::arg("qkv"), py::arg("out"), py::arg("filter"), py::arg("tau"))
        .def("set_head", &set_step_head, py::arg("embed"), py::arg("final_norm"), py::arg("final_eps"), py::arg("lm_head"),
             py::arg("dct"), py::arg("gate_weight"), py::arg("gate_bias"), py::arg("entropy_eps"))
        .def("step", &step_py, nogil);
    m.def("has_avx2", &cpu_has_avx2);
    m.def("set_scalar", &set_scalar, "force the scalar path (tests: it must give the AVX2 path's bits)");
    m.def("uses_avx2", &use_avx2);
}
