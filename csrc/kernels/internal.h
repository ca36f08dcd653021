// Internals shared by the driver (qgemm.cpp, qconv.cpp) and the per-ISA translation units.
// Nothing here is part of the public API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "onnxopt_kernels.h"

namespace onnxopt {
namespace detail {

// Everything the output stage needs, indexed by global column n. Row data (zero point, scale,
// row sum) is passed per tile. Output element (m, n) lives at out[m * ldm + n * ldn].
struct Epilogue {
  int K = 0;
  const std::int32_t* colsum = nullptr;  // [Np]
  const std::int32_t* wzp = nullptr;     // [Np] or null (all zero)
  const float* wscale = nullptr;         // [N], per-tensor scale already expanded
  const float* bias = nullptr;           // [N] or null
  Activation act = Activation::None;
  float lo = 0.f, hi = 0.f;
  bool requant = false;
  float out_scale = 1.f, out_zp = 0.f;
  float* cf = nullptr;
  std::uint8_t* cu = nullptr;
  std::ptrdiff_t ldm = 0, ldn = 1;
};

// One micro-tile: rows [0, mr) of the packed A block starting at `A` (row stride lda bytes,
// Kp bytes per row, zero padded), the packed B panel starting at `B` (nb column blocks of the
// ISA's NR columns, interleaved per k-group), ncols valid columns starting at global column n.
struct Tile {
  const std::uint8_t* A;
  int lda;
  const void* B;
  int Kp;
  int mr, nb, ncols;
  int m, n;                   // global output coordinates of the tile's top-left element
  const std::int32_t* rzp;    // [mr] activation zero point per row
  const float* rscale;        // [mr] activation scale per row
  const std::int32_t* rsum;   // [mr] row sums of A, or null when the weights have no zero point
};

// Direct (implicit-GEMM) stride-1 convolution of one group, output channels x pixels, written
// straight into the NCHW output. The input is quantized once into X: [CGp][L][4] u8, i.e. groups
// of 4 input channels interleaved per padded pixel (pixel index p = h * Wp + w of the zero-point
// padded image, L >= every pixel read). Output "pixel" q = oh * Wp + ow runs over the padded width;
// columns ow >= OW are computed and discarded. Tap t reads X at pixel q + tap_off[t].
// Weights W: [Mp][Kd] s8 with Kd = taps * CGp * 4, k = (t * CGp + cg) * 4 + c4, zero padded
// (channels >= Cg, rows >= Mg). acc = sum W * X; y = float(acc - zp * wsum[oc]) * (a_scale *
// wscale[oc]) (+ bias[oc]), activation: the contract's output stage for a per-tensor zero point.
struct DirectConv {
  const std::uint8_t* X;
  std::ptrdiff_t L;
  const std::int8_t* W;
  int Kd, CGp, taps;
  const int* tap_off;
  int Wp, OH, OW;
  int Mg;
  const std::int32_t* wsum;
  std::int32_t zp;
  float a_scale;
  const float* wscale;  // [Mg] (group offset applied)
  const float* bias;    // [Mg] or null
  Activation act;
  float lo, hi;
  float* Y;             // [Mg][OH * OW]
  const float* R;       // residual laid out like Y (added before the activation) or null
  std::uint8_t* Yu;     // u8 output laid out like Y (then Y is null): requantized after the activation
  float out_scale, out_zp;
  std::ptrdiff_t oplane;
};

// A per-ISA kernel set. Packed B layout for an ISA: panels of NB*NR columns; inside a panel,
// for each k-group of KR rows, NB blocks of [NR columns][KR k] elements (elem bytes each).
// The last panel may hold fewer blocks. A is always u8, rows padded with zeros to Kp (a multiple
// of the ISA's kpad), and the A block is zero padded to a multiple of MR rows.
struct IsaOps {
  Isa isa;
  int MR, NR, NB, KR, elem;
  void (*tile)(const Tile& t, const Epilogue& ep);
  void (*minmax)(const float* x, std::size_t n, float* lo, float* hi);  // lo/hi in-out
  void (*quant)(const float* x, std::size_t n, float scale, float zpf, std::uint8_t* q);
  // Direct depthwise conv on one zero-point padded u8 plane [Hp][Wp] into one output plane.
  void (*depthwise)(const std::uint8_t* xp, int Wp, const std::int8_t* w, int kH, int kW, int sh,
                    int sw, int dh, int dw, int OH, int OW, std::int32_t wsum, std::int32_t zp,
                    float a_scale, int oc, const Epilogue& ep, float* out, std::int32_t* scratch);
  // The same with u8 output requantized with ep.out_scale / ep.out_zp (null, or false returned:
  // not for this geometry; the caller then requantizes a float plane).
  bool (*depthwise_u8)(const std::uint8_t* xp, int Wp, const std::int8_t* w, int kH, int kW, int sh, int sw,
                       int dh, int dw, int OH, int OW, std::int32_t wsum, std::int32_t zp, float a_scale, int oc,
                       const Epilogue& ep, std::uint8_t* out) = nullptr;
  // A u8 plane [H][W] into a zero-point (z) padded plane [Hp][Wp] at row pt, column pl (null:
  // memset and memcpy).
  void (*pad_u8_plane)(const std::uint8_t* x, int H, int W, int pt, int pl, int Hp, int Wp, std::uint8_t z,
                       std::uint8_t* dst) = nullptr;
  int kpad = 4;                        // packed K is padded to a multiple of this
  void (*task_begin)() = nullptr;      // per-thread setup around a GEMM task (AMX tile config)
  void (*task_end)() = nullptr;
  // Direct conv (null: the ISA uses the im2col GEMM path). Computes output channels [oc0, oc1)
  // (multiples of conv_mt, may run past Mg up to Mp) for pixels q in [q0, q1) (q0 a multiple of
  // conv_qt, q1 of conv_qmin; X must hold every pixel those tiles read).
  void (*conv_direct)(const DirectConv& d, int oc0, int oc1, int q0, int q1) = nullptr;
  int conv_mt = 1, conv_qt = 1, conv_cg_align = 1;
  // The pixel range is padded to a multiple of conv_qmin (<= conv_qt, dividing it): conv_direct
  // then also takes q1 - q0 a multiple of conv_qmin, its last tile narrower (0: conv_qt).
  int conv_qmin = 0;
  // Requantize n floats: q = clamp(nearbyint(y / scale) + zpf, 0, 255). Set on every ISA.
  void (*requant)(const float* y, std::size_t n, float scale, float zpf, std::uint8_t* q) = nullptr;
  // Quantize H rows of W contiguous floats into rows of dst (row stride ldd), one setup for all rows
  // (null: quant per row).
  void (*quant_plane)(const float* x, int H, int W, float scale, float zpf, std::uint8_t* dst, int ldd) = nullptr;
  // Quantize n floats of 4 channel rows (x[i] null: the zero point) into n interleaved 4-byte pixels.
  void (*quant_pack4)(const float* const* x, int n, float scale, float zpf, std::uint8_t* dst) = nullptr;
  const char* kernel = "";  // the micro-kernel's name (PackedWeights::kernel)
};

const IsaOps& ops_scalar();
const IsaOps& ops_avx2();
// AVX2 with vpmaddubsw on s8 weights: exact only for weights no k-pair of which can saturate
// (pack_b checks, see kernel_avx2.cpp); same ISA as ops_avx2.
const IsaOps& ops_avx2_u8();
const IsaOps& ops_avx512vnni();
const IsaOps& ops_amx();
const IsaOps& ops_for(Isa isa);  // throws std::invalid_argument if the CPU cannot run it
bool isa_supported(Isa isa);

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// One parallel region for "a serial prologue, then tasks": the first slot to start runs pro while
// the other slots wait for it, then all take fn's tasks [0, total) from a shared counter. Without a
// spinning pool the calling thread starts the prologue at once and the workers' wake-up overlaps
// it, instead of every region costing a wake-up on the critical path (cpu.cpp).
void run_after(const Parallel& par, void (*pro)(void*), void* pro_data, void (*fn)(void*, std::size_t),
               std::size_t total, void* data);

// 64-byte aligned scratch from a per-thread cache of freed blocks (scratch.cpp).
void* scratch_alloc(std::size_t bytes);
void scratch_free(void* p);

struct AlignedFree {
  void operator()(void* p) const { scratch_free(p); }
};
template <class T>
using AlignedBuf = std::unique_ptr<T[], AlignedFree>;
template <class T>
AlignedBuf<T> aligned_alloc_n(std::size_t n) {
  return AlignedBuf<T>(static_cast<T*>(scratch_alloc(n * sizeof(T) + 64)));  // +64: vector over-read slack
}

}  // namespace detail
}  // namespace onnxopt
