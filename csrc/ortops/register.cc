// Library entry point: ORT calls RegisterCustomOps(options, api_base) from
// SessionOptions.register_custom_ops_library() / RegisterCustomOpsLibrary_V2, or directly through
// RegisterCustomOpsUsingFunction when the application links or dlopens the library itself.
#include <mutex>
#include <vector>

#include "custom_op.h"
#include "ops.h"

#define ONNXOPT_EXPORT extern "C" __attribute__((visibility("default")))

using namespace onnxopt::ortops;

ONNXOPT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;  // nothing to report through
  const OrtApi* a = api_base->GetApi(kOrtApiVersion);
  if (a == nullptr) {
    // Cannot build an OrtStatus without an API table; a null table means an onnxruntime < 1.17.
    const OrtApi* any = api_base->GetApi(1);
    return any ? any->CreateStatus(ORT_FAIL, "libonnxopt_ops needs onnxruntime >= 1.17 (ORT API version 17)")
               : nullptr;
  }
  set_api(a);
  return guarded([&] {
    // Domains must outlive every session created from `options`; they are tiny and the library can
    // be unloaded before ORT lets go of them, so they are deliberately never released.
    static std::mutex mu;
    static auto* domains = new std::vector<OrtCustomOpDomain*>();
    OrtCustomOpDomain* domain = nullptr;
    check(api().CreateCustomOpDomain(kDomain, &domain));
    {
      std::lock_guard<std::mutex> lock(mu);
      domains->push_back(domain);
    }
    const PoolConfig pool = pool_for(options);
    check(api().CustomOpDomain_Add(domain, make_custom_op<QGemmKernel>(pool)));
    check(api().CustomOpDomain_Add(domain, make_custom_op<QConvKernel>(pool)));
    check(api().AddCustomOpDomain(options, domain));
  });
}

// Same entry point under the name the onnxruntime-extensions convention uses for a second library.
ONNXOPT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOpsAltName(OrtSessionOptions* options, const OrtApiBase* api_base) {
  return RegisterCustomOps(options, api_base);
}
