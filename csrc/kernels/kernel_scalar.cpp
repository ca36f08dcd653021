// Portable scalar micro-kernel. Compiled with the baseline flags only. Uses the same packed
// layout as the AVX512-VNNI kernel (16 columns x 4 k per block, 4 blocks per panel).
#include <cmath>
#include <cstring>

#include "internal.h"

namespace onnxopt {
namespace detail {
namespace scalar_isa {

#include "isa_generic.h"

constexpr int kMR = 4, kNR = 16, kNB = 4, kKR = 4;

void tile(const Tile& t, const Epilogue& ep) {
  std::int32_t acc[kMR][kNB * kNR];
  std::memset(acc, 0, sizeof(acc));
  const auto* B = static_cast<const std::int8_t*>(t.B);
  const int kg = t.Kp / kKR;
  const int cols = t.nb * kNR;
  for (int k = 0; k < kg; ++k) {
    const std::int8_t* b = B + static_cast<std::ptrdiff_t>(k) * cols * kKR;
    for (int r = 0; r < t.mr; ++r) {
      const std::uint8_t* a = t.A + static_cast<std::ptrdiff_t>(r) * t.lda + k * kKR;
      const std::int32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
      std::int32_t* c = acc[r];
      for (int j = 0; j < cols; ++j) {
        const std::int8_t* bj = b + j * kKR;
        c[j] += a0 * bj[0] + a1 * bj[1] + a2 * bj[2] + a3 * bj[3];
      }
    }
  }
  epilogue_generic(&acc[0][0], kNB * kNR, t, ep);
}

}  // namespace scalar_isa

const IsaOps& ops_scalar() {
  static const IsaOps ops = [] {
    IsaOps o{Isa::Scalar, scalar_isa::kMR, scalar_isa::kNR, scalar_isa::kNB, scalar_isa::kKR, 1,
             scalar_isa::tile, scalar_isa::minmax_generic, scalar_isa::quant_generic,
             scalar_isa::depthwise_generic};
    o.kernel = "scalar";
    o.requant = scalar_isa::requant_generic;
    return o;
  }();
  return ops;
}

}  // namespace detail
}  // namespace onnxopt
