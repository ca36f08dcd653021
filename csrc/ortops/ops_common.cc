#include <cmath>

#include "ops.h"

namespace onnxopt::ortops {

namespace {
[[noreturn]] void fail(const std::string& where, const std::string& msg) {
  throw OpError("onnxopt " + where + ": " + msg);
}
}  // namespace

void read_static_quant(OrtKernelContext* ctx, std::size_t scale_idx, std::size_t zp_idx,
                       const std::string& where, StaticQuant* q) {
  const OrtValue* s = input_or_null(ctx, scale_idx);
  const OrtValue* z = input_or_null(ctx, zp_idx);
  if (s == nullptr) {
    if (z != nullptr) fail(where, "x_zero_point is given without x_scale");
    q->scale = nullptr;
    q->zero_point = nullptr;
    return;
  }
  TensorRef st = tensor_ref(s);
  if (st.count != 1) fail(where, "x_scale must hold one value, got shape " + shape_str(st.shape));
  float sv = *st.as<float>();
  if (!(sv > 0.f) || !std::isfinite(sv)) fail(where, "x_scale must be positive and finite, got " + std::to_string(sv));
  q->scale = st.as<float>();
  if (z != nullptr) {
    TensorRef zt = tensor_ref(z);
    if (zt.count != 1) fail(where, "x_zero_point must hold one value, got shape " + shape_str(zt.shape));
    q->zero_point = zt.as<std::uint8_t>();
  } else {
    q->zp_storage = 0;
    q->zero_point = &q->zp_storage;
  }
}

std::string scale_and_bias_problem(const TensorRef* w_scale, const TensorRef* bias, int n, const char* n_name) {
  const std::string want_n = std::string(n_name) + " = " + std::to_string(n);
  const std::vector<std::int64_t> column{static_cast<std::int64_t>(n)};
  if (w_scale != nullptr) {
    const auto& s = w_scale->shape;
    // The element count alone would take a [2, 4] scale for N = 8 and read it as 8 columns.
    const bool per_tensor = s.empty() || s == std::vector<std::int64_t>{1};
    if (!per_tensor && s != column)
      return "w_scale must have shape [], [1] or [" + std::to_string(n) + "] (" + want_n + "), got " + shape_str(s);
  }
  if (bias != nullptr && bias->shape != column)
    return "bias must have shape [" + std::to_string(n) + "] (" + want_n + "), got " + shape_str(bias->shape);
  return "";
}

void read_scales_and_bias(OrtKernelContext* ctx, std::size_t scale_idx, std::size_t bias_idx, int n,
                          const char* n_name, const std::string& where, OutputStage* stage) {
  TensorRef s = tensor_ref(input_or_null(ctx, scale_idx));
  TensorRef bt;
  const OrtValue* b = input_or_null(ctx, bias_idx);
  if (b != nullptr) bt = tensor_ref(b);
  const std::string problem = scale_and_bias_problem(&s, b != nullptr ? &bt : nullptr, n, n_name);
  if (!problem.empty()) fail(where, problem);
  stage->w_scale = s.as<float>();
  stage->per_column = s.count != 1;
  stage->bias = b != nullptr ? bt.as<float>() : nullptr;
}

void check_constant_scale_and_bias(const NodeInfo& info, std::size_t scale_idx, std::size_t bias_idx, int n,
                                   const char* n_name) {
  const OrtValue* s = info.constant_input(scale_idx);
  const OrtValue* b = info.constant_input(bias_idx);
  TensorRef st, bt;
  if (s != nullptr) st = tensor_ref(s);
  if (b != nullptr) bt = tensor_ref(b);
  const std::string problem =
      scale_and_bias_problem(s != nullptr ? &st : nullptr, b != nullptr ? &bt : nullptr, n, n_name);
  if (!problem.empty()) info.fail(problem);
}

void check_static_inputs(const NodeInfo& info, std::size_t scale_idx, std::size_t zp_idx) {
  if (info.has_input(zp_idx) && !info.has_input(scale_idx))
    info.fail("x_zero_point is given without x_scale (static quantization needs both, dynamic neither)");
}

}  // namespace onnxopt::ortops
