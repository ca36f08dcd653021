// The blocked GEMM driver shared by qgemm and qconv (internal).
#pragma once

#include <vector>

#include "internal.h"

namespace onnxopt {
namespace detail {

class PackedB final : public PackedWeights {
 public:
  int K() const override { return K_; }
  int N() const override { return N_; }
  Isa isa() const override { return ops->isa; }
  const char* kernel() const override { return ops->kernel; }
  const void* panel(int p) const { return data.get() + static_cast<std::size_t>(p) * panel_bytes; }
  int panels() const { return (N_ + ops->NR * ops->NB - 1) / (ops->NR * ops->NB); }

  int K_ = 0, N_ = 0, Kp = 0, Np = 0;
  const IsaOps* ops = nullptr;
  AlignedBuf<std::int8_t> data;
  std::size_t panel_bytes = 0;  // a full panel (NB blocks)
  std::vector<std::int32_t> colsum;  // [Np]
  std::vector<std::int32_t> wzp;     // [Np], empty when there is no weight zero point
};

// B element (k, n) is B[k * ldk + n * ldn].
std::shared_ptr<PackedB> pack_b(const std::int8_t* B, int K, int N, std::ptrdiff_t ldk, std::ptrdiff_t ldn,
                                Isa isa, const std::int8_t* w_zp);

// Produces rows [m0, m0 + mb) of the u8 A operand into buf (row stride ldb; bytes K..ldb must be
// zeroed) with the zero point and scale of each row.
struct ASource {
  void (*fill)(const void* ctx, int m0, int mb, std::uint8_t* buf, int ldb, std::int32_t* zp, float* scale);
  const void* ctx;
  // Optional: A is already a u8 matrix (row m at direct + m * direct_lda, K bytes) that full
  // micro-tiles may read in place when the ISA's padded K equals K; params() then gives the zero
  // point and scale of rows [m0, m0 + mb) without copying.
  const std::uint8_t* direct = nullptr;
  std::ptrdiff_t direct_lda = 0;
  void (*params)(const void* ctx, int m0, int mb, std::int32_t* zp, float* scale) = nullptr;
};

// out(m, n) = epilogue(A(m, :) x B(:, n)) for m < M. ep.colsum / ep.wzp / ep.K are filled in here.
void run_gemm(const PackedB& B, int M, const ASource& src, Epilogue ep, const Parallel& par);

// The same split into tasks without running them (M > 0): gemm_task(&job, i) for i < mchunks *
// nchunks; parallel: whether the split is meant for the pool. wake_hidden: the tasks will run
// with run_after (finer tasks pay when the wake-up overlaps a prologue).
struct GemmJob {
  const PackedB* B;
  int M;
  ASource src;
  Epilogue ep;
  int mtiles, mchunks, nchunks, mc;
  bool parallel;
};
GemmJob plan_gemm(const PackedB& B, int M, const ASource& src, Epilogue ep, const Parallel& par, bool wake_hidden);
void gemm_task(void* job, std::size_t i);

// Dynamic quantization parameters of the numerics contract from a row's (or image's) range.
void dynamic_params(float lo, float hi, float* scale, float* zpf);

std::vector<float> expand_scale(const OutputStage& st, int N);

}  // namespace detail
}  // namespace onnxopt
