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

void read_scales_and_bias(OrtKernelContext* ctx, std::size_t scale_idx, std::size_t bias_idx, int n,
                          const std::string& where, OutputStage* stage) {
  TensorRef s = tensor_ref(input_or_null(ctx, scale_idx));
  if (s.count != 1 && s.count != static_cast<std::size_t>(n))
    fail(where, "w_scale must have 1 or " + std::to_string(n) + " elements, got shape " + shape_str(s.shape));
  stage->w_scale = s.as<float>();
  stage->per_column = s.count != 1;
  stage->bias = nullptr;
  if (const OrtValue* b = input_or_null(ctx, bias_idx)) {
    TensorRef bt = tensor_ref(b);
    if (bt.count != static_cast<std::size_t>(n))
      fail(where, "bias must have " + std::to_string(n) + " elements, got shape " + shape_str(bt.shape));
    stage->bias = bt.as<float>();
  }
}

void check_static_inputs(const NodeInfo& info, std::size_t scale_idx, std::size_t zp_idx) {
  if (info.has_input(zp_idx) && !info.has_input(scale_idx))
    info.fail("x_zero_point is given without x_scale (static quantization needs both, dynamic neither)");
}

}  // namespace onnxopt::ortops
