// OrtCustomOp filled from a kernel class, at struct version kOrtApiVersion (17): ORT reads only the
// fields that existed in API 17 (through GetEndVersion), so later fields stay null.
//
// A Kernel provides
//   static constexpr const char* kName;
//   static const IoSpec kInputs[];  static constexpr std::size_t kNumInputs;
//   static constexpr ONNXTensorElementDataType kOutputType;  (one output; UNDEFINED: the type of the
//   kernel's one UNDEFINED-typed input, which ORT requires to be unique)
//   Kernel(const OrtKernelInfo*, const PoolConfig&);   // validates and packs; throws OpError
//   void compute(OrtKernelContext*) const;      // const: concurrent Run() calls share the kernel
#pragma once

#include <climits>

#include "ort_glue.h"

namespace onnxopt::ortops {

// One registration's copy of an op: ORT hands the OrtCustomOp* back to CreateKernelV2, so the
// session's intra-op thread count (read from its options at registration) travels with it.
struct OpInstance {
  OrtCustomOp op;  // first member: OrtCustomOp* <-> OpInstance*
  PoolConfig pool;
};

template <class Kernel>
const OrtCustomOp& custom_op_template() {
  static const OrtCustomOp op = [] {
    OrtCustomOp o{};
    o.version = kOrtApiVersion;
    o.GetName = [](const OrtCustomOp*) -> const char* { return Kernel::kName; };
    o.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
    o.GetInputTypeCount = [](const OrtCustomOp*) -> std::size_t { return Kernel::kNumInputs; };
    o.GetInputType = [](const OrtCustomOp*, std::size_t i) { return Kernel::kInputs[i].type; };
    o.GetInputCharacteristic = [](const OrtCustomOp*, std::size_t i) {
      return Kernel::kInputs[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    o.GetOutputTypeCount = [](const OrtCustomOp*) -> std::size_t { return 1; };
    o.GetOutputType = [](const OrtCustomOp*, std::size_t) { return Kernel::kOutputType; };
    o.GetOutputCharacteristic = [](const OrtCustomOp*, std::size_t) { return INPUT_OUTPUT_REQUIRED; };
    o.GetInputMemoryType = [](const OrtCustomOp*, std::size_t) { return OrtMemTypeDefault; };
    o.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    o.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    o.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    o.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    o.CreateKernel = nullptr;  // V2 below reports errors as OrtStatus
    o.KernelCompute = nullptr;
    o.CreateKernelV2 = [](const OrtCustomOp* self, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
      *kernel = nullptr;
      const PoolConfig pool = reinterpret_cast<const OpInstance*>(self)->pool;
      return guarded([&] { *kernel = new Kernel(info, pool); });
    };
    o.KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) {
      return guarded([&] { static_cast<const Kernel*>(kernel)->compute(ctx); });
    };
    o.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    o.InferOutputShapeFn = nullptr;
    o.GetStartVersion = [](const OrtCustomOp*) { return 1; };
    o.GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
    return o;
  }();
  return op;
}

// A new, never freed, instance (ORT keeps the pointer for as long as sessions use the domain).
template <class Kernel>
const OrtCustomOp* make_custom_op(const PoolConfig& pool) {
  auto* inst = new OpInstance{custom_op_template<Kernel>(), pool};
  return &inst->op;
}

}  // namespace onnxopt::ortops
