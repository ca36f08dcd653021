#include "ort_glue.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <thread>

namespace onnxopt::ortops {

namespace {
std::atomic<const OrtApi*> g_api{nullptr};

// Releases an OrtStatus and reports whether it was a success.
bool ok(OrtStatus* st) {
  if (st == nullptr) return true;
  api().ReleaseStatus(st);
  return false;
}

struct TypeShapeInfo {
  OrtTensorTypeAndShapeInfo* p = nullptr;
  ~TypeShapeInfo() {
    if (p) api().ReleaseTensorTypeAndShapeInfo(p);
  }
};
}  // namespace

const OrtApi& api() { return *g_api.load(std::memory_order_acquire); }
void set_api(const OrtApi* a) { g_api.store(a, std::memory_order_release); }

void check(OrtStatus* status) {
  if (status == nullptr) return;
  std::string msg = api().GetErrorMessage(status);
  OrtErrorCode code = api().GetErrorCode(status);
  api().ReleaseStatus(status);
  throw OpError(msg, code);
}

NodeInfo::NodeInfo(const OrtKernelInfo* info, const char* op_type) : info_(info) {
  std::size_t size = 0;
  std::string name;
  if (ok(api().KernelInfo_GetNodeName(info, nullptr, &size)) && size > 1) {
    name.resize(size);
    if (ok(api().KernelInfo_GetNodeName(info, name.data(), &size))) name.resize(size - 1);
    else name.clear();
  }
  where_ = std::string(op_type) + (name.empty() ? std::string(" node") : " node '" + name + "'");
  check(api().KernelInfo_GetInputCount(info, &n_inputs_));
}

void NodeInfo::fail(const std::string& msg) const { throw OpError("onnxopt " + where_ + ": " + msg); }

bool NodeInfo::try_get(const char* name, std::string* out) const {
  std::size_t size = 0;
  if (!ok(api().KernelInfoGetAttribute_string(info_, name, nullptr, &size))) return false;
  std::string s(size, '\0');
  if (size > 0) check(api().KernelInfoGetAttribute_string(info_, name, s.data(), &size));
  while (!s.empty() && s.back() == '\0') s.pop_back();
  *out = s;
  return true;
}

bool NodeInfo::try_get(const char* name, std::int64_t* out) const {
  return ok(api().KernelInfoGetAttribute_int64(info_, name, out));
}

bool NodeInfo::has_attribute(const char* name) const {
  std::size_t size = 0;
  float f = 0.f;
  std::int64_t i = 0;
  return ok(api().KernelInfoGetAttribute_string(info_, name, nullptr, &size)) ||
         ok(api().KernelInfoGetAttribute_int64(info_, name, &i)) ||
         ok(api().KernelInfoGetAttribute_float(info_, name, &f)) ||
         ok(api().KernelInfoGetAttributeArray_int64(info_, name, nullptr, &size)) ||
         ok(api().KernelInfoGetAttributeArray_float(info_, name, nullptr, &size));
}

namespace {
// An attribute that the typed getter could not read: absent (false) or of another type (an error).
bool absent_or_fail(const NodeInfo& info, const char* name, const char* type) {
  if (info.has_attribute(name)) info.fail(std::string("attribute ") + name + " must be " + type);
  return false;
}
}  // namespace

bool NodeInfo::get(const char* name, std::string* out) const {
  return try_get(name, out) || absent_or_fail(*this, name, "a string");
}

bool NodeInfo::get(const char* name, float* out) const {
  return ok(api().KernelInfoGetAttribute_float(info_, name, out)) || absent_or_fail(*this, name, "a float");
}

bool NodeInfo::get(const char* name, std::int64_t* out) const {
  return try_get(name, out) || absent_or_fail(*this, name, "an int");
}

bool NodeInfo::get(const char* name, std::vector<std::int64_t>* out) const {
  std::size_t size = 0;
  if (!ok(api().KernelInfoGetAttributeArray_int64(info_, name, nullptr, &size)))
    return absent_or_fail(*this, name, "a list of ints");
  out->assign(size, 0);
  if (size > 0) check(api().KernelInfoGetAttributeArray_int64(info_, name, out->data(), &size));
  return true;
}

bool NodeInfo::has_input(std::size_t i) const {
  if (i >= n_inputs_) return false;
  std::size_t size = 0;
  if (!ok(api().KernelInfo_GetInputName(info_, i, nullptr, &size))) return false;
  return size > 1;  // size counts the terminating NUL; an absent optional input has name ""
}

const OrtValue* NodeInfo::constant_input(std::size_t i) const {
  if (!has_input(i)) return nullptr;
  int is_constant = 0;
  const OrtValue* v = nullptr;
  if (!ok(api().KernelInfoGetConstantInput_tensor(info_, i, &is_constant, &v))) return nullptr;
  return is_constant ? v : nullptr;
}

TensorRef tensor_ref(const OrtValue* v) {
  TensorRef t;
  TypeShapeInfo info;
  check(api().GetTensorTypeAndShape(v, &info.p));
  check(api().GetTensorElementType(info.p, &t.type));
  std::size_t rank = 0;
  check(api().GetDimensionsCount(info.p, &rank));
  t.shape.assign(rank, 0);
  if (rank) check(api().GetDimensions(info.p, t.shape.data(), rank));
  check(api().GetTensorShapeElementCount(info.p, &t.count));
  void* data = nullptr;
  // GetTensorMutableData is the only accessor in API 17; the ops never write through it.
  check(api().GetTensorMutableData(const_cast<OrtValue*>(v), &data));
  t.data = data;
  return t;
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    default: return "other";
  }
}

std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

const OrtValue* input_or_null(OrtKernelContext* ctx, std::size_t i) {
  std::size_t n = 0;
  check(api().KernelContext_GetInputCount(ctx, &n));
  if (i >= n) return nullptr;
  const OrtValue* v = nullptr;
  check(api().KernelContext_GetInput(ctx, i, &v));
  return v;
}

float* output_f32(OrtKernelContext* ctx, std::size_t i, const std::vector<std::int64_t>& shape) {
  OrtValue* v = nullptr;
  check(api().KernelContext_GetOutput(ctx, i, shape.data(), shape.size(), &v));
  void* data = nullptr;
  check(api().GetTensorMutableData(v, &data));
  return static_cast<float*>(data);
}

std::uint8_t* output_u8(OrtKernelContext* ctx, std::size_t i, const std::vector<std::int64_t>& shape) {
  OrtValue* v = nullptr;
  check(api().KernelContext_GetOutput(ctx, i, shape.data(), shape.size(), &v));
  void* data = nullptr;
  check(api().GetTensorMutableData(v, &data));
  return static_cast<std::uint8_t*>(data);
}

namespace {
void run_on_ort_pool(void* c, void (*fn)(void*, std::size_t), std::size_t total, void* data) {
  auto* kc = static_cast<const OrtKernelContext*>(c);
  // num_batch = 0: one task per index; the kernels already cut the work into `degree`-sized chunks.
  OrtStatus* st = api().KernelContext_ParallelFor(kc, fn, total, 0, data);
  if (st != nullptr) {
    // The pool refused (should not happen on CPU): run serially rather than drop work.
    api().ReleaseStatus(st);
    for (std::size_t i = 0; i < total; ++i) fn(data, i);
  }
}

int default_degree() {
  static const int degree = [] {
    if (const char* e = std::getenv("ONNXOPT_PARALLEL_DEGREE")) {
      int v = std::atoi(e);
      if (v > 0) return v;
    }
    unsigned hc = std::thread::hardware_concurrency();
    return static_cast<int>(std::clamp(hc, 1u, 256u));
  }();
  return degree;
}
}  // namespace

Parallel parallel_for(const OrtKernelContext* ctx, const PoolConfig& pool) {
  const int degree = pool.degree;
  Parallel p;
  p.run = &run_on_ort_pool;
  p.ctx = const_cast<OrtKernelContext*>(ctx);
  p.degree = degree;  // 1: the kernels run serially without touching the pool
  p.cheap_wake = pool.spinning;
  return p;
}

PoolConfig pool_for(const OrtSessionOptions* options) {
  PoolConfig pool;
  pool.degree = degree_for(options);
  int has = 0;
  if (options != nullptr && ok(api().HasSessionConfigEntry(options, "session.intra_op.allow_spinning", &has)) && has) {
    char buf[16] = {0};
    std::size_t size = sizeof(buf);
    if (ok(api().GetSessionConfigEntry(options, "session.intra_op.allow_spinning", buf, &size)))
      pool.spinning = std::string(buf) != "0";
  }
  return pool;
}

int degree_for(const OrtSessionOptions* options) {
  int has = 0;
  if (options != nullptr && ok(api().HasSessionConfigEntry(options, kThreadsConfigKey, &has)) && has) {
    char buf[32] = {0};
    std::size_t size = sizeof(buf);
    if (ok(api().GetSessionConfigEntry(options, kThreadsConfigKey, buf, &size))) {
      int v = std::atoi(buf);
      if (v > 0) return std::min(v, 1024);
    }
  }
  return default_degree();
}

void read_activation(const NodeInfo& info, OutputStage* stage) {
  std::string s;
  std::int64_t code = 0;
  if (info.try_get("activation", &s)) {
    if (s == "none" || s.empty()) stage->act = Activation::None;
    else if (s == "relu") stage->act = Activation::Relu;
    else if (s == "clip") stage->act = Activation::Clip;
    else info.fail("activation must be \"none\", \"relu\" or \"clip\", got \"" + s + "\"");
  } else if (info.try_get("activation", &code)) {
    if (code < 0 || code > 2) info.fail("activation must be 0 (none), 1 (relu) or 2 (clip), got " + std::to_string(code));
    stage->act = static_cast<Activation>(code);
  } else if (info.has_attribute("activation")) {
    info.fail("activation must be a string (\"none\", \"relu\", \"clip\") or an int (0, 1, 2), got another type");
  } else {
    stage->act = Activation::None;
  }
  float lo = -std::numeric_limits<float>::infinity(), hi = std::numeric_limits<float>::infinity();
  info.get("clip_min", &lo);
  info.get("clip_max", &hi);
  if (stage->act == Activation::Clip && !(lo <= hi))
    info.fail("clip_min (" + std::to_string(lo) + ") must not exceed clip_max (" + std::to_string(hi) + ")");
  stage->clip_lo = lo;
  stage->clip_hi = hi;
}

}  // namespace onnxopt::ortops
