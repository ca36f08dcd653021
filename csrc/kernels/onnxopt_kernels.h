// Public C++ face of the onnxopt int8 kernels. Consumed by the pybind11 module (csrc/python) and the
// onnxruntime custom ops (csrc/ortops). Knows nothing of ONNX or Python.
//
// Numerics contract (the numba backend in src/onnxopt/kernels mirrors it bit for bit):
//   * A is u8 with a zero point per row (a_zp), B is s8 [K, N] with an optional zero point per
//     column (w_zp, default 0). acc[m,n] = sum_k (A[m,k] - a_zp[m]) * (B[k,n] - w_zp[n]) in int32,
//     computed as sum_k A*B - a_zp[m]*colsum[n] - w_zp[n]*rowsum[m] + K*a_zp[m]*w_zp[n].
//   * Float output: y = float(acc) * (a_scale[m] * w_scale[n]); y = y + bias[n]; then activation
//     (relu: max(y, 0); clip: min(max(y, lo), hi)). The product a_scale*w_scale is computed in float
//     first. No FMA contraction anywhere in the output stage (-ffp-contract=off).
//   * Convolution with a residual R: y = float(acc) * (a_scale * w_scale); y = y + bias; y = y + R;
//     then the activation (each step a separately rounded float operation, in this order).
//   * Requantized u8 output: q = clamp(nearbyint(y / out_scale) + out_zp, 0, 255) with
//     round-half-to-even (default rounding mode), y being the float output after activation.
//   * Dynamic activation quantization, per row m: lo = min(0, min_k x), hi = max(0, max_k x);
//     scale = (hi - lo) / 255 (scale = 1 when hi == lo); zp = clamp(nearbyint(-lo / scale), 0, 255);
//     q = clamp(nearbyint(x / scale) + zp, 0, 255).
//   * Static activation quantization (per tensor, scale s and zero point z given):
//     q = clamp(nearbyint(x / s) + z, 0, 255).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace onnxopt {

// Ordered by capability; Amx (AMX-INT8 tiles, Sapphire Rapids and later) was added after the first
// three and is only chosen when the OS grants the tile state (arch_prctl XCOMP_PERM).
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2, Amx = 3 };

// Best ISA this CPU and OS support (CPUID + XGETBV), capped by ONNXOPT_ISA=scalar|avx2|avx512vnni|amx.
Isa active_isa();
Isa detected_isa();  // ignoring the environment
const char* isa_name(Isa isa);

// Parallel-for supplied by the caller: run fn(data, i) for every i in [0, total), possibly
// concurrently. ORT's KernelContext_ParallelFor inside custom ops, a thread pool or a plain loop
// from Python. `degree` is how many threads may run at once (used to choose the partition).
struct Parallel {
  void (*run)(void* ctx, void (*fn)(void* data, std::size_t i), std::size_t total, void* data) = nullptr;
  void* ctx = nullptr;
  int degree = 1;
  // Waking the threads for a parallel region is cheap (a spinning pool). When false (onnxruntime
  // with session.intra_op.allow_spinning=0) each region costs a wake-up of tens of microseconds,
  // and the kernels parallelize only work large enough to pay for it.
  bool cheap_wake = true;
  void operator()(void (*fn)(void*, std::size_t), std::size_t total, void* data) const;  // serial if run is null
};

enum class Activation : int { None = 0, Relu = 1, Clip = 2 };

// Output stage, chosen once per call; the driver instantiates one inner loop per combination.
struct OutputStage {
  const float* w_scale = nullptr;  // [N] if per_column else [1]
  bool per_column = false;
  const float* bias = nullptr;     // [N] or null
  Activation act = Activation::None;
  float clip_lo = 0.f, clip_hi = 0.f;
  // Requantized output instead of float: set requant = true and give the output scale/zero point.
  bool requant = false;
  float out_scale = 1.f;
  std::uint8_t out_zp = 0;
  // Convolution only: a float tensor laid out like the output ([N, M, OH, OW]) added after the
  // bias and before the activation (a residual connection fused into the conv):
  // y = act(float(acc) * (a_scale * w_scale) + bias + residual). Float output only.
  const float* residual = nullptr;
};

// Weights B [K, N] (row-major, s8) packed once for `isa`, with column sums and the weight zero
// points. Immutable after packing, shareable between threads.
class PackedWeights {
 public:
  virtual ~PackedWeights() = default;
  virtual int K() const = 0;
  virtual int N() const = 0;
  virtual Isa isa() const = 0;
  // The micro-kernel the weights were packed for, e.g. "avx2-u8" (vpmaddubsw: the weights cannot
  // saturate it) or "avx2-s16" (widened); for tests and benchmarks.
  virtual const char* kernel() const = 0;
};

std::shared_ptr<const PackedWeights> pack_weights(const std::int8_t* B, int K, int N, Isa isa,
                                                  const std::int8_t* w_zp = nullptr /* [N] or null */);

// C[M, N] = output_stage(A[M, K] (u8, row stride lda) x packed B). One of c_f32 / c_u8 is used,
// per stage.requant. a_zp and a_scale have M entries when per_row_a, else one.
void qgemm(const std::uint8_t* A, int M, int lda, const std::uint8_t* a_zp, const float* a_scale,
           bool per_row_a, const PackedWeights& B, const OutputStage& stage, float* c_f32,
           std::uint8_t* c_u8, int ldc, const Parallel& par);

// Float A in, quantized per row on the fly (dynamic) or with a fixed per-tensor scale/zero point
// (static: x_scale != null), fused with the GEMM. Float output (stage.requant must be false).
void qgemm_f32(const float* A, int M, int lda, const float* x_scale, const std::uint8_t* x_zp,
               const PackedWeights& B, const OutputStage& stage, float* C, int ldc, const Parallel& par);

// Quantize a float row block to u8 (the same arithmetic qgemm_f32 uses), for tests and callers.
void quantize_rows_dynamic(const float* x, int M, int K, int ldx, std::uint8_t* q, int ldq,
                           float* scale, std::uint8_t* zp);
void quantize_static(const float* x, std::size_t n, float scale, std::uint8_t zp, std::uint8_t* q);
// The same with an explicit ISA (bit-identical results; for tests). Throws std::invalid_argument
// when the CPU cannot run `isa`.
void quantize_rows_dynamic(const float* x, int M, int K, int ldx, std::uint8_t* q, int ldq,
                           float* scale, std::uint8_t* zp, Isa isa);
void quantize_static(const float* x, std::size_t n, float scale, std::uint8_t zp, std::uint8_t* q,
                     Isa isa);

// 2-D convolution, NCHW float in / float out, int8 weights [M, C/group, kH, kW] packed once.
struct ConvParams {
  int C = 0, M = 0, group = 1;
  int kH = 1, kW = 1;
  int stride_h = 1, stride_w = 1;
  int dil_h = 1, dil_w = 1;
  int pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
};

class PackedConv {
 public:
  virtual ~PackedConv() = default;
  virtual const ConvParams& params() const = 0;
};

std::shared_ptr<const PackedConv> pack_conv_weights(const std::int8_t* W, const ConvParams& p, Isa isa);

// X [N, C, H, W] float -> Y [N, M, OH, OW] float. Activations quantized per tensor: static when
// x_scale != null, else dynamic over the whole image batch item (per image n, same rule as rows).
// stage.w_scale is per output channel when per_column.
void qconv2d_f32(const float* X, int N, int H, int W, const float* x_scale, const std::uint8_t* x_zp,
                 const PackedConv& w, const OutputStage& stage, float* Y, const Parallel& par);

// The same convolution on u8 activations: X [N, C, H, W] already quantized per tensor with
// (x_scale, x_zp); Y [N, M, OH, OW] u8, requantized with stage.out_scale / stage.out_zp
// (stage.requant must be true). Bit-identical to qconv2d_f32 on the dequantized input
// x = (X - x_zp) * x_scale with static (x_scale, x_zp), followed by the requantization (the
// round trip of each value through dequantization and quantization is exact).
void qconv2d_u8(const std::uint8_t* X, int N, int H, int W, float x_scale, std::uint8_t x_zp,
                const PackedConv& w, const OutputStage& stage, std::uint8_t* Y, const Parallel& par);

// Isa that conv weights were packed for (the micro-kernel they run on).
Isa packed_conv_isa(const PackedConv& w);

// Measured throughput ceiling of one core, GOP/s (a multiply-add counts 2), for the instruction
// mix `name` (one of peak_probe_names(): the probes this CPU can run), best over ~`seconds`.
std::vector<std::string> peak_probe_names();
double peak_probe(const std::string& name, double seconds);

inline int conv_out_dim(int in, int k, int stride, int dil, int pad0, int pad1) {
  return (in + pad0 + pad1 - dil * (k - 1) - 1) / stride + 1;
}

}  // namespace onnxopt
