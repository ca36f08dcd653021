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
  int kpad = 4;                        // packed K is padded to a multiple of this
  void (*task_begin)() = nullptr;      // per-thread setup around a GEMM task (AMX tile config)
  void (*task_end)() = nullptr;
};

const IsaOps& ops_scalar();
const IsaOps& ops_avx2();
const IsaOps& ops_avx512vnni();
const IsaOps& ops_amx();
const IsaOps& ops_for(Isa isa);  // throws std::invalid_argument if the CPU cannot run it
bool isa_supported(Isa isa);

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

struct AlignedFree {
  void operator()(void* p) const { ::operator delete(p, std::align_val_t(64)); }
};
template <class T>
using AlignedBuf = std::unique_ptr<T[], AlignedFree>;
template <class T>
AlignedBuf<T> aligned_alloc_n(std::size_t n) {
  void* p = ::operator new(n * sizeof(T) + 64, std::align_val_t(64));  // +64: vector over-read slack
  return AlignedBuf<T>(static_cast<T*>(p));
}

}  // namespace detail
}  // namespace onnxopt
