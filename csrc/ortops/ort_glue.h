// The few pieces of onnxruntime's C API the ops need, wrapped so that errors are C++ exceptions
// inside the library and OrtStatus at its boundary. Only onnxruntime_c_api.h is used: the API table
// arrives through RegisterCustomOps, at version kOrtApiVersion, so the library loads into any
// onnxruntime from 1.17 on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"
#include "onnxopt_kernels.h"

namespace onnxopt::ortops {

constexpr std::uint32_t kOrtApiVersion = 17;
constexpr const char* kDomain = "com.onnxopt";

const OrtApi& api();            // valid after set_api()
void set_api(const OrtApi* a);  // called by RegisterCustomOps

struct OpError : std::runtime_error {
  explicit OpError(const std::string& msg, OrtErrorCode c = ORT_INVALID_ARGUMENT)
      : std::runtime_error(msg), code(c) {}
  OrtErrorCode code;
};

void check(OrtStatus* status);  // throws OpError carrying the status' message (and releases it)

// Runs f and turns any exception into an OrtStatus (nullptr on success).
template <class F>
OrtStatus* guarded(F&& f) noexcept {
  try {
    f();
    return nullptr;
  } catch (const OpError& e) {
    return api().CreateStatus(e.code, e.what());
  } catch (const std::bad_alloc&) {
    return api().CreateStatus(ORT_RUNTIME_EXCEPTION, "onnxopt: out of memory");
  } catch (const std::exception& e) {
    return api().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
  } catch (...) {
    return api().CreateStatus(ORT_RUNTIME_EXCEPTION, "onnxopt: unknown error");
  }
}

// ---- kernel creation: node attributes and constant inputs ----
class NodeInfo {
 public:
  NodeInfo(const OrtKernelInfo* info, const char* op_type);
  const std::string& where() const { return where_; }  // "QGemm node 'name'" for error messages
  [[noreturn]] void fail(const std::string& msg) const;

  // false when the attribute is absent; present with another type it is an error (a float where
  // an int is expected must not silently mean "absent")
  bool get(const char* name, std::string* out) const;
  bool get(const char* name, float* out) const;
  bool get(const char* name, std::int64_t* out) const;
  bool get(const char* name, std::vector<std::int64_t>* out) const;
  // The same without the type check, for attributes that take one of several types.
  bool try_get(const char* name, std::string* out) const;
  bool try_get(const char* name, std::int64_t* out) const;
  bool has_attribute(const char* name) const;  // present, whatever its type

  std::size_t input_count() const { return n_inputs_; }
  bool has_input(std::size_t i) const;                 // present and not an empty optional name
  const OrtValue* constant_input(std::size_t i) const;  // nullptr unless a constant initializer

 private:
  const OrtKernelInfo* info_;
  std::string where_;
  std::size_t n_inputs_ = 0;
};

// A tensor's element type, shape and data (non-owning).
struct TensorRef {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<std::int64_t> shape;
  std::size_t count = 0;
  const void* data = nullptr;
  template <class T>
  const T* as() const { return static_cast<const T*>(data); }
};
TensorRef tensor_ref(const OrtValue* v);
const char* type_name(ONNXTensorElementDataType t);
std::string shape_str(const std::vector<std::int64_t>& s);

// ---- kernel compute ----
const OrtValue* input_or_null(OrtKernelContext* ctx, std::size_t i);  // nullptr for absent optionals
float* output_f32(OrtKernelContext* ctx, std::size_t i, const std::vector<std::int64_t>& shape);
std::uint8_t* output_u8(OrtKernelContext* ctx, std::size_t i, const std::vector<std::int64_t>& shape);
// The session's intra-op pool as the kernels see it: its thread count and whether its threads spin
// between parallel regions (session.intra_op.allow_spinning, default on). Without spinning every
// region pays a thread wake-up, so the kernels keep more work per task.
struct PoolConfig {
  int degree = 1;
  bool spinning = true;
};

// Parallel-for on the session's intra-op pool for this call.
Parallel parallel_for(const OrtKernelContext* ctx, const PoolConfig& pool);

// Session config entry naming the intra-op thread count (ORT gives kernels no way to ask);
// onnxopt.runtime sets it from SessionOptions.intra_op_num_threads before registering.
constexpr const char* kThreadsConfigKey = "onnxopt.intra_op_num_threads";
// Degree for a registration: the config entry when set and positive, else ONNXOPT_PARALLEL_DEGREE,
// else the machine's hardware threads.
int degree_for(const OrtSessionOptions* options);
PoolConfig pool_for(const OrtSessionOptions* options);

// Fused activation attributes shared by both ops: activation ("none" | "relu" | "clip", or the
// integers 0 | 1 | 2), clip_min / clip_max (default -inf / +inf).
void read_activation(const NodeInfo& info, OutputStage* stage);

// Type/characteristic tables shared by the OrtCustomOp definitions.
struct IoSpec {
  ONNXTensorElementDataType type;
  bool optional;
};

}  // namespace onnxopt::ortops
