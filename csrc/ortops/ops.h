// The two kernels of domain com.onnxopt (see passes.md, "Custom operators", for the operator contract).
#pragma once

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ort_glue.h"

namespace onnxopt::ortops {

// Static activation quantization inputs, read per call (constant or not).
struct StaticQuant {
  const float* scale = nullptr;          // null: dynamic quantization
  const std::uint8_t* zero_point = nullptr;
  std::uint8_t zp_storage = 0;
};

class QGemmKernel {
 public:
  static constexpr const char* kName = "QGemm";
  enum Input : std::size_t { X = 0, W, WScale, Bias, XScale, XZeroPoint, WZeroPoint };
  static const IoSpec kInputs[];
  static constexpr std::size_t kNumInputs = 7;
  static constexpr ONNXTensorElementDataType kOutputType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

  QGemmKernel(const OrtKernelInfo* info, const PoolConfig& pool);
  void compute(OrtKernelContext* ctx) const;

 private:
  std::string where_;
  PoolConfig pool_;
  int K_ = 0, N_ = 0;
  std::shared_ptr<const PackedWeights> packed_;
  OutputStage act_;  // activation and clip bounds only; scales and bias come per call
};

class QConvKernel {
 public:
  static constexpr const char* kName = "QConv";
  enum Input : std::size_t { X = 0, W, WScale, Bias, XScale, XZeroPoint, Residual, YScale, YZeroPoint };
  static const IoSpec kInputs[];
  static constexpr std::size_t kNumInputs = 9;
  // X is float or uint8 (then already quantized with x_scale / x_zero_point); Y has X's type
  // (uint8: requantized with y_scale / y_zero_point).
  static constexpr ONNXTensorElementDataType kOutputType = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  enum class AutoPad { NotSet, SameUpper, SameLower, Valid };

  QConvKernel(const OrtKernelInfo* info, const PoolConfig& pool);
  void compute(OrtKernelContext* ctx) const;

 private:
  using Pads = std::array<int, 4>;  // top, left, bottom, right
  Pads pads_for(int H, int W) const;
  std::shared_ptr<const PackedConv> packed_for(const Pads& pads) const;

  std::string where_;
  PoolConfig pool_;
  ConvParams base_;  // everything but the pads
  AutoPad auto_pad_ = AutoPad::NotSet;
  Pads explicit_pads_{0, 0, 0, 0};
  OutputStage act_;
  std::shared_ptr<const PackedConv> fixed_;  // explicit pads / VALID: packed at creation
  std::vector<std::int8_t> weights_;  // kept for auto_pad = SAME_*, whose pads depend on H and W
  // Packed weights per pad set: auto_pad = SAME_* only, at most stride_h * stride_w for SAME_*.
  mutable std::mutex mu_;
  mutable std::map<Pads, std::shared_ptr<const PackedConv>> packed_;
};

// Per-call inputs shared by both ops; `where` names the node in error messages.
void read_static_quant(OrtKernelContext* ctx, std::size_t scale_idx, std::size_t zp_idx,
                       const std::string& where, StaticQuant* q);
// w_scale ([1] or [n]) into stage->w_scale / per_column, bias ([n], optional) into stage->bias.
void read_scales_and_bias(OrtKernelContext* ctx, std::size_t scale_idx, std::size_t bias_idx, int n,
                          const char* n_name, const std::string& where, OutputStage* stage);
// "" when w_scale's shape is [], [1] or [n] and bias's (when given) is [n], else what is wrong.
std::string scale_and_bias_problem(const TensorRef* w_scale, const TensorRef* bias, int n, const char* n_name);
// Creation-time check of w_scale and bias when they are constant (per call otherwise).
void check_constant_scale_and_bias(const NodeInfo& info, std::size_t scale_idx, std::size_t bias_idx, int n,
                                   const char* n_name);
// Creation-time checks of the optional inputs that have a fixed type and size.
void check_static_inputs(const NodeInfo& info, std::size_t scale_idx, std::size_t zp_idx);

}  // namespace onnxopt::ortops
