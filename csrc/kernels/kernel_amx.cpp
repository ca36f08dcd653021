// AMX-INT8 micro-kernel (tdpbusd). Compiled with the AVX-512 flags plus -mamx-tile -mamx-int8;
// only reached when CPUID reports AMX-TILE/AMX-INT8 and the OS granted the tile state.
//
// Packed B is the VNNI layout with panels of 2 blocks of 16 columns: a k-group of one block is 64
// bytes [16 columns][4 k], so 16 consecutive k-groups of a block, read with the panel's row stride,
// are exactly one B tile (16 rows x 64 bytes). K is padded to a multiple of 64 (one A tile row).
// The micro-tile is 32 rows x 32 columns: tmm0-3 accumulate, tmm4/5 hold A, tmm6/7 hold B.
// Accumulators go through a stack buffer into the AVX-512 output stage.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "internal.h"

namespace onnxopt {
namespace detail {
namespace amx_isa {

#include "isa_generic.h"
#include "avx512_epilogue.h"

constexpr int kMR = 32, kNR = 16, kNB = 2, kKR = 4;

struct alignas(64) TileConfig {
  std::uint8_t palette_id;
  std::uint8_t start_row;
  std::uint8_t reserved[14];
  std::uint16_t colsb[16];
  std::uint8_t rows[16];
};

void task_begin() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  // GCC 12 does not see that ldtilecfg reads the whole struct and drops the stores: force them.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

void task_end() { _tile_release(); }

template <int MT, int NB>
static void kernel(const Tile& t, const Epilogue& ep) {
  _tile_zero(0);
  if (NB == 2) _tile_zero(1);
  if (MT == 2) _tile_zero(2);
  if (MT == 2 && NB == 2) _tile_zero(3);
  const std::int8_t* B = static_cast<const std::int8_t*>(t.B);
  const int bstride = NB * 64;
  const int ksteps = t.Kp / 64;
  const std::uint8_t* A0 = t.A;
  const std::uint8_t* A1 = t.A + static_cast<std::ptrdiff_t>(16) * t.lda;
  for (int k = 0; k < ksteps; ++k) {
    const std::int8_t* b = B + static_cast<std::ptrdiff_t>(k) * 16 * bstride;
    _tile_loadd(4, A0 + k * 64, t.lda);
    _tile_loadd(6, b, bstride);
    _tile_dpbusd(0, 4, 6);
    if (NB == 2) {
      _tile_loadd(7, b + 64, bstride);
      _tile_dpbusd(1, 4, 7);
    }
    if (MT == 2) {
      _tile_loadd(5, A1 + k * 64, t.lda);
      _tile_dpbusd(2, 5, 6);
      if (NB == 2) _tile_dpbusd(3, 5, 7);
    }
  }
  alignas(64) std::int32_t acc[32][32];
  _tile_stored(0, &acc[0][0], 128);
  if (NB == 2) _tile_stored(1, &acc[0][16], 128);
  if (MT == 2) _tile_stored(2, &acc[16][0], 128);
  if (MT == 2 && NB == 2) _tile_stored(3, &acc[16][16], 128);
  if (fast_transposed(ep) && !ep.wzp) {
    transposed_tile(&acc[0][0], 32, t, ep);
    return;
  }
  alignas(64) float ybuf[32 * kYLd];
  for (int j = 0; j < NB; ++j) {
    const int n = t.n + j * 16;
    const __mmask16 mask = col_mask(t.ncols - j * 16);
    const __m512i csum = _mm512_loadu_si512(ep.colsum + n);
    const __m512i wzp = ep.wzp ? _mm512_loadu_si512(ep.wzp + n) : _mm512_setzero_si512();
    const __m512 ws = _mm512_maskz_loadu_ps(mask, ep.wscale + n);
    const __m512 bias = ep.bias ? _mm512_maskz_loadu_ps(mask, ep.bias + n) : _mm512_setzero_ps();
    for (int r = 0; r < t.mr; ++r)
      finish_vec(_mm512_load_si512(&acc[r][j * 16]), r, j, t, ep, csum, wzp, ws, bias, mask, ybuf);
  }
  if (fast_transposed(ep)) transposed_store(ybuf, t, ep);
}

void tile(const Tile& t, const Epilogue& ep) {
  if (t.mr > 16) {
    if (t.nb == 2) kernel<2, 2>(t, ep); else kernel<2, 1>(t, ep);
  } else {
    if (t.nb == 2) kernel<1, 2>(t, ep); else kernel<1, 1>(t, ep);
  }
}

// Direct conv: C tiles hold [16 output channels][16 pixels]; A = weights (s8, 16 rows of 64 k
// bytes, row stride Kd), B = packed activations (u8, 16 channel groups x 16 pixels x 4 channels,
// row stride L * 4), hence tdpbsud (signed x unsigned). 2 x 2 C tiles: 32 channels x 32 pixels.
void conv_direct(const DirectConv& d, int oc0, int oc1, int q0, int q1) {
  const DirectEpi e(d);
  const int kc = d.CGp / 16;
  const std::ptrdiff_t bstride = d.L * 4;
  alignas(64) std::int32_t acc[32][32];
  // Channel blocks outer, pixels inner: the stores then form 32 sequential streams (one per
  // output plane) instead of one short burst per plane of the whole layer.
  DirectRow rows[32];
  for (int oc = oc0; oc < oc1; oc += 32) {
    const int nrows = d.Mg - oc < 32 ? d.Mg - oc : 32;
    for (int r = 0; r < nrows; ++r) rows[r] = direct_row(e, oc + r);  // once per channel block
    for (int q = q0; q < q1; q += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const std::int8_t* A0 = d.W + static_cast<std::ptrdiff_t>(oc) * d.Kd;
      const std::int8_t* A1 = A0 + static_cast<std::ptrdiff_t>(16) * d.Kd;
      for (int t = 0; t < d.taps; ++t) {
        const std::uint8_t* xb = d.X + static_cast<std::ptrdiff_t>(q + d.tap_off[t]) * 4;
        for (int cb = 0; cb < kc; ++cb) {
          const int k = (t * d.CGp + cb * 16) * 4;
          const std::uint8_t* b = xb + static_cast<std::ptrdiff_t>(cb) * 16 * bstride;
          _tile_loadd(4, A0 + k, d.Kd);
          _tile_loadd(6, b, bstride);
          _tile_dpbsud(0, 4, 6);
          _tile_loadd(7, b + 64, bstride);
          _tile_dpbsud(1, 4, 7);
          _tile_loadd(5, A1 + k, d.Kd);
          _tile_dpbsud(2, 5, 6);
          _tile_dpbsud(3, 5, 7);
        }
      }
      _tile_stored(0, &acc[0][0], 128);
      _tile_stored(1, &acc[0][16], 128);
      _tile_stored(2, &acc[16][0], 128);
      _tile_stored(3, &acc[16][16], 128);
      for (int r = 0; r < nrows; ++r) {
        direct_finish16(e, rows[r], q, _mm512_load_si512(&acc[r][0]));
        direct_finish16(e, rows[r], q + 16, _mm512_load_si512(&acc[r][16]));
      }
    }
  }
}

}  // namespace amx_isa

const IsaOps& ops_amx() {
  static const IsaOps ops = [] {
    const IsaOps& v = ops_avx512vnni();  // quantization and depthwise are the AVX-512 ones
    IsaOps o{Isa::Amx, amx_isa::kMR, amx_isa::kNR, amx_isa::kNB, amx_isa::kKR, 1,
             amx_isa::tile, v.minmax, v.quant, v.depthwise};
    o.kernel = "amx";
    o.kpad = 64;
    o.task_begin = amx_isa::task_begin;
    o.task_end = amx_isa::task_end;
    o.conv_direct = amx_isa::conv_direct;
    o.conv_mt = 32;
    o.conv_qt = 32;
    o.conv_cg_align = 16;
    o.quant_pack4 = v.quant_pack4;
    o.quant_plane = v.quant_plane;
    o.pad_u8_plane = v.pad_u8_plane;
    o.requant = v.requant;
    o.depthwise_u8 = v.depthwise_u8;
    return o;
  }();
  return ops;
}

}  // namespace detail
}  // namespace onnxopt
