// com.onnxopt::QGemm — Y[..., N] = epilogue(quantize(X[..., K]) x W[K, N]) with W packed once.
#include <limits>

#include "ops.h"

namespace onnxopt::ortops {

const IoSpec QGemmKernel::kInputs[] = {
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false},  // X
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, false},   // W
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false},  // w_scale
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true},   // bias
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true},   // x_scale
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, true},   // x_zero_point
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, true},    // w_zero_point
};

QGemmKernel::QGemmKernel(const OrtKernelInfo* kinfo, const PoolConfig& pool) : pool_(pool) {
  NodeInfo info(kinfo, kName);
  where_ = info.where();
  const OrtValue* w = info.constant_input(W);
  if (w == nullptr)
    info.fail("the weight W (input 1) must be a constant initializer so it can be packed once at session "
              "creation; it is computed or fed at run time here");
  TensorRef wt = tensor_ref(w);
  if (wt.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 || wt.shape.size() != 2)
    info.fail(std::string("W must be an int8 [K, N] tensor, got ") + type_name(wt.type) + " " + shape_str(wt.shape));
  if (wt.shape[0] < 1 || wt.shape[1] < 1 || wt.shape[0] > std::numeric_limits<int>::max() ||
      wt.shape[1] > std::numeric_limits<int>::max())
    info.fail("W has an unsupported shape " + shape_str(wt.shape));
  K_ = static_cast<int>(wt.shape[0]);
  N_ = static_cast<int>(wt.shape[1]);

  const std::int8_t* w_zp = nullptr;
  if (info.has_input(WZeroPoint)) {
    const OrtValue* z = info.constant_input(WZeroPoint);
    if (z == nullptr) info.fail("w_zero_point (input 6) must be a constant initializer");
    TensorRef zt = tensor_ref(z);
    if (zt.count != static_cast<std::size_t>(N_))
      info.fail("w_zero_point must have N = " + std::to_string(N_) + " elements, got shape " + shape_str(zt.shape));
    w_zp = zt.as<std::int8_t>();
  }
  // Fixed-size inputs are checked now when they are constant; per call otherwise.
  check_constant_scale_and_bias(info, WScale, Bias, N_, "N");
  check_static_inputs(info, XScale, XZeroPoint);
  read_activation(info, &act_);

  packed_ = pack_weights(wt.as<std::int8_t>(), K_, N_, active_isa(), w_zp);
}

void QGemmKernel::compute(OrtKernelContext* ctx) const {
  TensorRef x = tensor_ref(input_or_null(ctx, X));
  if (x.shape.size() < 2)
    throw OpError("onnxopt " + where_ + ": X must have rank >= 2, got shape " + shape_str(x.shape));
  if (x.shape.back() != K_)
    throw OpError("onnxopt " + where_ + ": X's last dimension must be K = " + std::to_string(K_) + ", got shape " +
                  shape_str(x.shape));
  const std::size_t M = x.count / static_cast<std::size_t>(K_);
  if (M > static_cast<std::size_t>(std::numeric_limits<int>::max()))
    throw OpError("onnxopt " + where_ + ": X has too many rows for the kernel (" + std::to_string(M) + ")");

  OutputStage stage = act_;
  read_scales_and_bias(ctx, WScale, Bias, N_, "N", where_, &stage);
  StaticQuant q;
  read_static_quant(ctx, XScale, XZeroPoint, where_, &q);

  std::vector<std::int64_t> y_shape = x.shape;
  y_shape.back() = N_;
  float* y = output_f32(ctx, 0, y_shape);
  if (M == 0) return;
  qgemm_f32(x.as<float>(), static_cast<int>(M), K_, q.scale, q.zero_point, *packed_, stage, y, N_,
            parallel_for(ctx, pool_));
}

}  // namespace onnxopt::ortops
