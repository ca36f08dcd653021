// com.onnxopt::QConv — 2-D convolution, NCHW float in and out, int8 weights packed once.
#include <cmath>
#include <limits>

#include "ops.h"

namespace onnxopt::ortops {

const IoSpec QConvKernel::kInputs[] = {
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, false},  // X: float, or uint8 (u8 in, u8 out)
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, false},   // W
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false},  // w_scale
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true},   // bias
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true},   // x_scale
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, true},   // x_zero_point
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true},   // residual: added before the activation
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true},   // y_scale: uint8 X only, the output's scale
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, true},   // y_zero_point
};

namespace {
std::vector<std::int64_t> ints_attr(const NodeInfo& info, const char* name, std::size_t n, std::int64_t dflt) {
  std::vector<std::int64_t> v;
  if (!info.get(name, &v)) return std::vector<std::int64_t>(n, dflt);
  if (v.size() != n)
    info.fail(std::string(name) + " must have " + std::to_string(n) + " values, got " + shape_str(v));
  return v;
}

int to_int(const NodeInfo& info, std::int64_t v, const char* what, std::int64_t lo) {
  if (v < lo || v > std::numeric_limits<int>::max())
    info.fail(std::string(what) + " out of range: " + std::to_string(v));
  return static_cast<int>(v);
}
}  // namespace

QConvKernel::QConvKernel(const OrtKernelInfo* kinfo, const PoolConfig& pool) : pool_(pool) {
  NodeInfo info(kinfo, kName);
  where_ = info.where();
  const OrtValue* w = info.constant_input(W);
  if (w == nullptr)
    info.fail("the weight W (input 1) must be a constant initializer so it can be packed once at session "
              "creation; it is computed or fed at run time here");
  TensorRef wt = tensor_ref(w);
  if (wt.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 || wt.shape.size() != 4)
    info.fail(std::string("W must be an int8 [M, C/group, kH, kW] tensor (2-D convolution only), got ") +
              type_name(wt.type) + " " + shape_str(wt.shape));

  std::int64_t group = 1;
  info.get("group", &group);
  ConvParams& p = base_;
  p.group = to_int(info, group, "group", 1);
  p.M = to_int(info, wt.shape[0], "M (W's dim 0)", 1);
  p.C = to_int(info, wt.shape[1] * group, "C (W's dim 1 x group)", 1);
  p.kH = to_int(info, wt.shape[2], "kH", 1);
  p.kW = to_int(info, wt.shape[3], "kW", 1);
  if (p.M % p.group != 0)
    info.fail("M = " + std::to_string(p.M) + " output channels is not divisible by group = " + std::to_string(p.group));

  std::vector<std::int64_t> ks;
  if (info.get("kernel_shape", &ks) && (ks.size() != 2 || ks[0] != p.kH || ks[1] != p.kW))
    info.fail("kernel_shape " + shape_str(ks) + " does not match W's shape " + shape_str(wt.shape));
  auto strides = ints_attr(info, "strides", 2, 1);
  auto dil = ints_attr(info, "dilations", 2, 1);
  auto pads = ints_attr(info, "pads", 4, 0);
  p.stride_h = to_int(info, strides[0], "strides", 1);
  p.stride_w = to_int(info, strides[1], "strides", 1);
  p.dil_h = to_int(info, dil[0], "dilations", 1);
  p.dil_w = to_int(info, dil[1], "dilations", 1);
  // ONNX order: [x1_begin, x2_begin, x1_end, x2_end] = top, left, bottom, right.
  for (int i = 0; i < 4; ++i) explicit_pads_[i] = to_int(info, pads[i], "pads", 0);

  std::string ap = "NOTSET";
  info.get("auto_pad", &ap);
  if (ap == "NOTSET" || ap.empty()) auto_pad_ = AutoPad::NotSet;
  else if (ap == "SAME_UPPER") auto_pad_ = AutoPad::SameUpper;
  else if (ap == "SAME_LOWER") auto_pad_ = AutoPad::SameLower;
  else if (ap == "VALID") auto_pad_ = AutoPad::Valid;
  else info.fail("auto_pad must be NOTSET, SAME_UPPER, SAME_LOWER or VALID, got \"" + ap + "\"");
  if (auto_pad_ != AutoPad::NotSet && explicit_pads_ != Pads{0, 0, 0, 0})
    info.fail("pads " + shape_str(pads) + " cannot be combined with auto_pad = " + ap);

  check_constant_scale_and_bias(info, WScale, Bias, p.M, "M");
  check_static_inputs(info, XScale, XZeroPoint);
  if (info.has_input(YZeroPoint) && !info.has_input(YScale))
    info.fail("y_zero_point is given without y_scale");
  read_activation(info, &act_);

  const auto* wdata = wt.as<std::int8_t>();
  if (auto_pad_ == AutoPad::NotSet || auto_pad_ == AutoPad::Valid) {
    Pads fixed = auto_pad_ == AutoPad::Valid ? Pads{0, 0, 0, 0} : explicit_pads_;
    ConvParams q = base_;
    q.pad_top = fixed[0], q.pad_left = fixed[1], q.pad_bottom = fixed[2], q.pad_right = fixed[3];
    fixed_ = pack_conv_weights(wdata, q, active_isa());
  } else {
    weights_.assign(wdata, wdata + wt.count);
  }
}

QConvKernel::Pads QConvKernel::pads_for(int H, int W) const {
  switch (auto_pad_) {
    case AutoPad::NotSet: return explicit_pads_;
    case AutoPad::Valid: return {0, 0, 0, 0};
    default: break;
  }
  // SAME_*: output = ceil(in / stride); the odd pad goes at the end (UPPER) or the beginning (LOWER).
  auto split = [&](int in, int k, int s, int d, int* begin, int* end) {
    long out = (static_cast<long>(in) + s - 1) / s;
    long total = std::max(0L, (out - 1) * s + static_cast<long>(d) * (k - 1) + 1 - in);
    long small = total / 2, big = total - small;
    *begin = static_cast<int>(auto_pad_ == AutoPad::SameUpper ? small : big);
    *end = static_cast<int>(auto_pad_ == AutoPad::SameUpper ? big : small);
  };
  Pads p{};
  split(H, base_.kH, base_.stride_h, base_.dil_h, &p[0], &p[2]);
  split(W, base_.kW, base_.stride_w, base_.dil_w, &p[1], &p[3]);
  return p;
}

std::shared_ptr<const PackedConv> QConvKernel::packed_for(const Pads& pads) const {
  if (fixed_) return fixed_;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = packed_.find(pads);
  if (it != packed_.end()) return it->second;
  ConvParams q = base_;
  q.pad_top = pads[0], q.pad_left = pads[1], q.pad_bottom = pads[2], q.pad_right = pads[3];
  auto packed = pack_conv_weights(weights_.data(), q, active_isa());
  packed_.emplace(pads, packed);
  return packed;
}

void QConvKernel::compute(OrtKernelContext* ctx) const {
  TensorRef x = tensor_ref(input_or_null(ctx, X));
  auto fail = [&](const std::string& msg) { throw OpError("onnxopt " + where_ + ": " + msg); };
  if (x.shape.size() != 4) fail("X must be NCHW (rank 4), got shape " + shape_str(x.shape));
  const bool u8 = x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  if (!u8 && x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    fail(std::string("X must be float or uint8, got ") + type_name(x.type));
  if (x.shape[1] != base_.C)
    fail("X has " + std::to_string(x.shape[1]) + " channels, W expects C = " + std::to_string(base_.C));
  constexpr std::int64_t kMax = std::numeric_limits<int>::max();
  if (x.shape[0] > kMax || x.shape[2] > kMax || x.shape[3] > kMax) fail("X is too large: " + shape_str(x.shape));
  const int N = static_cast<int>(x.shape[0]), H = static_cast<int>(x.shape[2]), Wd = static_cast<int>(x.shape[3]);

  const Pads pads = pads_for(H, Wd);
  const int OH = conv_out_dim(H, base_.kH, base_.stride_h, base_.dil_h, pads[0], pads[2]);
  const int OW = conv_out_dim(Wd, base_.kW, base_.stride_w, base_.dil_w, pads[1], pads[3]);
  if (H < 1 || Wd < 1 || OH < 1 || OW < 1)
    fail("input " + shape_str(x.shape) + " is smaller than the dilated kernel; output would be " +
         std::to_string(OH) + "x" + std::to_string(OW));

  OutputStage stage = act_;
  read_scales_and_bias(ctx, WScale, Bias, base_.M, "M", where_, &stage);
  StaticQuant q;
  read_static_quant(ctx, XScale, XZeroPoint, where_, &q);
  const OrtValue* ys = input_or_null(ctx, YScale);
  if (u8) {
    if (q.scale == nullptr) fail("a uint8 X needs x_scale (and x_zero_point): its quantization");
    if (ys == nullptr) fail("a uint8 X gives a uint8 Y, which needs y_scale (and y_zero_point)");
    TensorRef yst = tensor_ref(ys);
    if (yst.count != 1) fail("y_scale must hold one value, got shape " + shape_str(yst.shape));
    const float v = *yst.as<float>();
    if (!(v > 0.f) || !std::isfinite(v)) fail("y_scale must be positive and finite, got " + std::to_string(v));
    stage.requant = true;
    stage.out_scale = v;
    stage.out_zp = 0;
    if (const OrtValue* yz = input_or_null(ctx, YZeroPoint)) {
      TensorRef yzt = tensor_ref(yz);
      if (yzt.count != 1) fail("y_zero_point must hold one value, got shape " + shape_str(yzt.shape));
      stage.out_zp = *yzt.as<std::uint8_t>();
    }
  } else if (ys != nullptr) {
    fail("y_scale is only for a uint8 X (the output has X's type)");
  }

  if (const OrtValue* r = input_or_null(ctx, Residual)) {
    TensorRef rt = tensor_ref(r);
    const std::vector<std::int64_t> want{x.shape[0], base_.M, OH, OW};
    if (rt.shape != want)
      fail("residual must have the output's shape " + shape_str(want) + ", got " + shape_str(rt.shape));
    stage.residual = rt.as<float>();
  }
  const std::vector<std::int64_t> y_shape{x.shape[0], base_.M, OH, OW};
  std::shared_ptr<const PackedConv> packed = packed_for(pads);
  if (u8) {
    std::uint8_t* y = output_u8(ctx, 0, y_shape);
    if (N == 0) return;
    qconv2d_u8(x.as<std::uint8_t>(), N, H, Wd, *q.scale, *q.zero_point, *packed, stage, y, parallel_for(ctx, pool_));
    return;
  }
  float* y = output_f32(ctx, 0, y_shape);
  if (N == 0) return;
  qconv2d_f32(x.as<float>(), N, H, Wd, q.scale, q.zero_point, *packed, stage, y, parallel_for(ctx, pool_));
}

}  // namespace onnxopt::ortops
