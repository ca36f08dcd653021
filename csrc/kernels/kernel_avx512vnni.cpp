// AVX512-VNNI micro-kernel (vpdpbusd), output stage, quantization. Compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512vnni; only reached after the runtime CPUID/XGETBV check.
//
// Packed B: panels of up to 4 blocks of 16 columns; per k-group of 4 rows a block is 64 bytes
// [16 columns][4 k], so one zmm load gives vpdpbusd its s8 operand. A (u8) is broadcast 4 bytes at
// a time. The micro-tile is 6 rows x 64 columns: 24 zmm accumulators + 4 B registers + 1 A.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "internal.h"

namespace onnxopt {
namespace detail {
namespace avx512_isa {

#include "isa_generic.h"

constexpr int kMR = 6, kNR = 16, kNB = 4, kKR = 4;

#include "avx512_epilogue.h"

// The dot-product loops live in functions of their own that end by storing the accumulators,
// with compile-time indices, to a buffer; the output stage reads them from there. Inlined into
// the output stage, GCC 12 keeps the accumulator array in memory and its register allocation
// puts two zmm moves around every vpdpbusd plus stack stores in the k-loop (half the speed on
// Zen 4; clang did not). tools/check_codegen.py and tests/test_codegen.py keep it that way.
template <int MR, int NB>
[[gnu::noinline]] static void dot_tile(const std::uint8_t* A, int lda, const std::int8_t* B, int kg,
                                       std::int32_t (&acc)[MR][NB][16]) {
  __m512i c[MR][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) c[r][j] = _mm512_setzero_si512();
  const std::uint8_t* a[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a[r] = A + static_cast<std::ptrdiff_t>(r) * lda;
  for (int k = 0; k < kg; ++k) {
    __m512i b[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) b[j] = _mm512_load_si512(B + j * 64);
    B += NB * 64;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      std::int32_t av;
      std::memcpy(&av, a[r] + k * kKR, 4);
      const __m512i va = _mm512_set1_epi32(av);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) c[r][j] = _mm512_dpbusd_epi32(c[r][j], va, b[j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm512_store_si512(acc[r][j], c[r][j]);
}

template <int MR, int NB>
static void kernel(const Tile& t, const Epilogue& ep) {
  alignas(64) std::int32_t acc[MR][NB][16];
  dot_tile<MR, NB>(t.A, t.lda, static_cast<const std::int8_t*>(t.B), t.Kp / kKR, acc);
  alignas(64) float ybuf[MR * kYLd];
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) {
    const int n = t.n + j * 16;
    const __mmask16 mask = col_mask(t.ncols - j * 16);
    const __m512i csum = _mm512_loadu_si512(ep.colsum + n);
    const __m512i wzp = ep.wzp ? _mm512_loadu_si512(ep.wzp + n) : _mm512_setzero_si512();
    const __m512 ws = _mm512_maskz_loadu_ps(mask, ep.wscale + n);
    const __m512 bias = ep.bias ? _mm512_maskz_loadu_ps(mask, ep.bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) finish_vec(_mm512_load_si512(acc[r][j]), r, j, t, ep, csum, wzp, ws, bias, mask, ybuf);
  }
  if (fast_transposed(ep)) transposed_store(ybuf, t, ep);
}

using KernelFn = void (*)(const Tile&, const Epilogue&);

static const KernelFn kTable[kMR][kNB] = {
    {kernel<1, 1>, kernel<1, 2>, kernel<1, 3>, kernel<1, 4>},
    {kernel<2, 1>, kernel<2, 2>, kernel<2, 3>, kernel<2, 4>},
    {kernel<3, 1>, kernel<3, 2>, kernel<3, 3>, kernel<3, 4>},
    {kernel<4, 1>, kernel<4, 2>, kernel<4, 3>, kernel<4, 4>},
    {kernel<5, 1>, kernel<5, 2>, kernel<5, 3>, kernel<5, 4>},
    {kernel<6, 1>, kernel<6, 2>, kernel<6, 3>, kernel<6, 4>},
};

void tile(const Tile& t, const Epilogue& ep) { kTable[t.mr - 1][t.nb - 1](t, ep); }

void minmax(const float* x, std::size_t n, float* lo, float* hi) {
  __m512 l = _mm512_set1_ps(*lo), h = _mm512_set1_ps(*hi);
  __m512 l2 = l, h2 = h;
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
    l = _mm512_min_ps(x0, l);
    h = _mm512_max_ps(x0, h);
    l2 = _mm512_min_ps(x1, l2);
    h2 = _mm512_max_ps(x1, h2);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = col_mask(static_cast<int>(n - i < 16 ? n - i : 16));
    const __m512 x0 = _mm512_maskz_loadu_ps(m, x + i);
    l = _mm512_mask_min_ps(l, m, x0, l);
    h = _mm512_mask_max_ps(h, m, x0, h);
  }
  l = _mm512_min_ps(l2, l);
  h = _mm512_max_ps(h2, h);
  alignas(64) float lv[16], hv[16];
  _mm512_store_ps(lv, l);
  _mm512_store_ps(hv, h);
  float lo_ = lv[0], hi_ = hv[0];
  for (int k = 1; k < 16; ++k) {
    lo_ = lv[k] < lo_ ? lv[k] : lo_;
    hi_ = hv[k] > hi_ ? hv[k] : hi_;
  }
  *lo = lo_;
  *hi = hi_;
}



void quant(const float* x, std::size_t n, float scale, float zpf, std::uint8_t* q) {
  const QuantScale qs(scale, zpf);
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), quant16(_mm512_loadu_ps(x + i), qs));
  if (i < n) {
    const __mmask16 m = col_mask(static_cast<int>(n - i));
    store_u8x16(q + i, m, quant16(_mm512_maskz_loadu_ps(m, x + i), qs));
  }
}

void requant(const float* y, std::size_t n, float scale, float zpf, std::uint8_t* q) {
  std::size_t i = 0;
  const QuantScale qs(scale, zpf);
  for (; i + 16 <= n; i += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), quant16(_mm512_loadu_ps(y + i), qs));
  if (i < n) {
    const __mmask16 m = col_mask(static_cast<int>(n - i));
    store_u8x16(q + i, m, quant16(_mm512_maskz_loadu_ps(m, y + i), qs));
  }
}

void quant_plane(const float* x, int H, int W, float scale, float zpf, std::uint8_t* dst, int ldd) {
  const QuantScale qs(scale, zpf);
  const int full = W & ~15;
  const __mmask16 tail = col_mask(W - full);
  for (int h = 0; h < H; ++h) {
    const float* xr = x + static_cast<std::ptrdiff_t>(h) * W;
    std::uint8_t* q = dst + static_cast<std::ptrdiff_t>(h) * ldd;
    for (int i = 0; i < full; i += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), quant16(_mm512_loadu_ps(xr + i), qs));
    if (full < W) _mm_mask_storeu_epi8(q + full, tail, quant16(_mm512_maskz_loadu_ps(tail, xr + full), qs));
  }
}

// A u8 plane [H][W] into the zero-point padded plane dst [Hp][Wp] (the image at row pt, column
// pl): masked vector copies per row; the calls to memcpy for 7..56-byte rows were a fifth of a
// small-plane depthwise conv.
void pad_u8_plane(const std::uint8_t* x, int H, int W, int pt, int pl, int Hp, int Wp, std::uint8_t z,
                  std::uint8_t* dst) {
  const __m512i zv = _mm512_set1_epi8(static_cast<char>(z));
  const std::size_t all = static_cast<std::size_t>(Hp) * Wp;
  std::size_t i = 0;
  for (; i + 64 <= all; i += 64) _mm512_storeu_si512(dst + i, zv);
  if (i < all) _mm512_mask_storeu_epi8(dst + i, (~0ull) >> (64 - (all - i)), zv);
  for (int h = 0; h < H; ++h) {
    const std::uint8_t* src = x + static_cast<std::ptrdiff_t>(h) * W;
    std::uint8_t* row = dst + static_cast<std::ptrdiff_t>(pt + h) * Wp + pl;
    int w = 0;
    for (; w + 64 <= W; w += 64) _mm512_storeu_si512(row + w, _mm512_loadu_si512(src + w));
    if (w < W) {
      const __mmask64 m = (~0ull) >> (64 - (W - w));
      _mm512_mask_storeu_epi8(row + w, m, _mm512_maskz_loadu_epi8(m, src + w));
    }
  }
}

// 4 channel rows -> [n][4] u8 (channel-interleaved pixels) for the direct conv: the four int32
// results of a 16-pixel step are merged with shifts, one zmm holding 16 pixels x 4 channels.
template <bool kAll>
static void quant_pack4_impl(const float* const* x, int n, const QuantScale& qs, __m512i zv, std::uint8_t* dst) {
  for (int i = 0; i < n; i += 16) {
    const int rem = n - i;
    const __mmask16 m = col_mask(rem);
    __m512i v[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c)
      v[c] = (kAll || x[c]) ? quant16_i32(rem >= 16 ? _mm512_loadu_ps(x[c] + i) : _mm512_maskz_loadu_ps(m, x[c] + i), qs)
                            : zv;
    const __m512i lo = _mm512_or_si512(v[0], _mm512_slli_epi32(v[1], 8));
    const __m512i r = _mm512_ternarylogic_epi32(lo, _mm512_slli_epi32(v[2], 16), _mm512_slli_epi32(v[3], 24), 0xFE);
    std::uint8_t* o = dst + static_cast<std::ptrdiff_t>(i) * 4;
    if (rem >= 16)
      _mm512_storeu_si512(o, r);
    else
      _mm512_mask_storeu_epi32(o, m, r);
  }
}

void quant_pack4(const float* const* x, int n, float scale, float zpf, std::uint8_t* dst) {
  const QuantScale qs(scale, zpf);
  const __m512i zv = _mm512_set1_epi32(static_cast<std::int32_t>(zpf));
  if (x[0] && x[1] && x[2] && x[3])
    quant_pack4_impl<true>(x, n, qs, zv, dst);
  else
    quant_pack4_impl<false>(x, n, qs, zv, dst);
}

// Direct conv micro-tile: 8 output channels x 48 pixels, 24 zmm accumulators; the activations
// (u8, 16 pixels x 4 channels per load) are vpdpbusd's unsigned operand, 4 weight bytes of one
// channel broadcast the signed one.
constexpr int kCMR = 8, kCNB = 3;

// One tile's dot products over NCB blocks of 16 pixels (its own function: see dot_tile).
template <int NCB>
[[gnu::noinline]] static void direct_dot(const DirectConv& d, const std::int8_t* w, const std::uint8_t* xq,
                                         std::int32_t (&acc)[kCMR][kCNB][16]) {
  const std::ptrdiff_t plane = d.L * 4;
  __m512i c[kCMR][NCB];
#pragma GCC unroll 8
  for (int r = 0; r < kCMR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NCB; ++j) c[r][j] = _mm512_setzero_si512();
  for (int t = 0; t < d.taps; ++t) {
    const std::uint8_t* xb = xq + static_cast<std::ptrdiff_t>(d.tap_off[t]) * 4;
    const std::int8_t* wt = w + t * d.CGp * 4;
    for (int cg = 0; cg < d.CGp; ++cg) {
      const std::uint8_t* x = xb + cg * plane;
      __m512i b[NCB];
#pragma GCC unroll 4
      for (int j = 0; j < NCB; ++j) b[j] = _mm512_loadu_si512(x + j * 64);
#pragma GCC unroll 8
      for (int r = 0; r < kCMR; ++r) {
        std::int32_t wv;
        std::memcpy(&wv, wt + static_cast<std::ptrdiff_t>(r) * d.Kd + cg * 4, 4);
        const __m512i vw = _mm512_set1_epi32(wv);
#pragma GCC unroll 4
        for (int j = 0; j < NCB; ++j) c[r][j] = _mm512_dpbusd_epi32(c[r][j], b[j], vw);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kCMR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NCB; ++j) _mm512_store_si512(acc[r][j], c[r][j]);
}

// Output channels [oc, oc + rows) x pixels [q, q + 16 NCB): dot products, then the output stage.
template <int NCB, class Finish>
static void direct_tile(const DirectConv& d, const DirectRow* rowc, int rows, int oc, int q, Finish finish) {
  alignas(64) std::int32_t acc[kCMR][kCNB][16];
  direct_dot<NCB>(d, d.W + static_cast<std::ptrdiff_t>(oc) * d.Kd, d.X + static_cast<std::ptrdiff_t>(q) * 4, acc);
  for (int j = 0; j < NCB; ++j) {
    const std::ptrdiff_t off = finish.offset(q + 16 * j);  // once per vector column, not per row
    for (int r = 0; r < rows; ++r) finish(rowc[r], q + 16 * j, off, _mm512_load_si512(acc[r][j]));
  }
}

// The generic output stage (direct_finish16) behind the interface of FastFinish.
struct GenericFinish {
  const DirectEpi& e;
  std::ptrdiff_t offset(int) const { return -1; }
  void operator()(const DirectRow& row, int q, std::ptrdiff_t, __m512i acc) const { direct_finish16(e, row, q, acc); }
};

// direct_finish16 for the common case, its choices made at compile time: no residual, 16 pixels
// inside one output row (offset(q) >= 0: their place in the output plane, once per vector column;
// kFull: the output width is the padded width, as in 1x1 convs). On 64-channel 1x1 convs (16
// k-steps per tile) the generic output stage's per-vector tests and masks were a quarter of the
// time. Same arithmetic, same order; other vectors take the generic stage.
template <bool kU8, bool kBias, bool kFull>
struct FastFinish {
  const DirectEpi& e;
  std::ptrdiff_t offset(int q) const {
    if (kFull) return q + 16 <= e.nq ? q : -1;
    if (q >= e.nq) return -1;
    const int oh = q / e.Wp, ow = q - oh * e.Wp;
    return ow + 16 <= e.OW ? static_cast<std::ptrdiff_t>(oh) * e.OW + ow : -1;
  }
  void operator()(const DirectRow& row, int q, std::ptrdiff_t off, __m512i acc) const {
    if (off < 0) {
      direct_finish16(e, row, q, acc);
      return;
    }
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, row.corr)), row.s);
    if (kBias) y = _mm512_add_ps(y, row.b);
    if (e.act == Activation::Relu) {
      y = _mm512_max_ps(y, _mm512_setzero_ps());
    } else if (e.act == Activation::Clip) {
      y = _mm512_max_ps(y, e.lo);
      y = _mm512_min_ps(y, e.hi);
    }
    if (kU8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(e.Yu + row.base + off), requant16(y, e.oq));
    else
      _mm512_storeu_ps(e.Y + row.base + off, y);
  }
};

template <class Finish>
static void conv_direct_with(const DirectConv& d, const DirectEpi& e, int oc0, int oc1, int q0, int q1, Finish finish) {
  DirectRow rowc[kCMR];
  for (int oc = oc0; oc < oc1; oc += kCMR) {
    const int nrows = d.Mg - oc < kCMR ? d.Mg - oc : kCMR;
    for (int r = 0; r < nrows; ++r) rowc[r] = direct_row(e, oc + r);  // once per channel block
    // full 48-pixel tiles, then one of 16 or 32 pixels: a ragged pixel range (a 14x14 1x1 conv's
    // 196 pixels) computes 208 instead of 240
    int q = q0;
    for (; q + 16 * kCNB <= q1; q += 16 * kCNB) direct_tile<kCNB>(d, rowc, nrows, oc, q, finish);
    if (q1 - q == 32)
      direct_tile<2>(d, rowc, nrows, oc, q, finish);
    else if (q1 - q == 16)
      direct_tile<1>(d, rowc, nrows, oc, q, finish);
  }
}

template <bool kFull>
static void conv_direct_fast(const DirectConv& d, const DirectEpi& e, int oc0, int oc1, int q0, int q1) {
  if (e.Yu) {
    if (e.bias)
      conv_direct_with(d, e, oc0, oc1, q0, q1, FastFinish<true, true, kFull>{e});
    else
      conv_direct_with(d, e, oc0, oc1, q0, q1, FastFinish<true, false, kFull>{e});
  } else {
    if (e.bias)
      conv_direct_with(d, e, oc0, oc1, q0, q1, FastFinish<false, true, kFull>{e});
    else
      conv_direct_with(d, e, oc0, oc1, q0, q1, FastFinish<false, false, kFull>{e});
  }
}

void conv_direct(const DirectConv& d, int oc0, int oc1, int q0, int q1) {
  const DirectEpi e(d);
  if (e.R)
    conv_direct_with(d, e, oc0, oc1, q0, q1, GenericFinish{e});
  else if (e.Wp == e.OW)
    conv_direct_fast<true>(d, e, oc0, oc1, q0, q1);
  else
    conv_direct_fast<false>(d, e, oc0, oc1, q0, q1);
}

// Depthwise with vpdpbusd: 16 outputs of a row per vector; each 32-bit lane gathers the 4 input
// bytes under one kernel row (kW <= 4 taps, the rest weighted 0) with vpermd + vpshufb, so a
// kernel row costs one vpdpbusd. R output rows are computed together: each input row is loaded
// and shuffled once and feeds every output row it belongs to. Other geometries: generic loops.
struct DwCtx {
  __m512i wv[16];
  __m512i perm, shuf, corr;
  __m512 vs, vb, lo, hi;
  bool bias;
  Activation act;
  __mmask64 lmask;
  int sw, kW;
  QuantScale oq{1.f, 0.f};  // u8 output: requantization
};

static inline __m512i dw_prep(const DwCtx& c, const std::uint8_t* src, __mmask64 m) {
  return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(c.perm, _mm512_maskz_loadu_epi8(m, src)), c.shuf);
}

template <class OutT>
static inline void dw_store(const DwCtx& c, __m512i acc, OutT* o, __mmask16 m) {
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, c.corr)), c.vs);
  if (c.bias) y = _mm512_add_ps(y, c.vb);
  if (c.act == Activation::Relu) {
    y = _mm512_max_ps(y, _mm512_setzero_ps());
  } else if (c.act == Activation::Clip) {
    y = _mm512_max_ps(y, c.lo);
    y = _mm512_min_ps(y, c.hi);
  }
  if constexpr (std::is_same_v<OutT, std::uint8_t>)
    store_u8x16(o, m, requant16(y, c.oq));
  else
    _mm512_mask_storeu_ps(o, m, y);
}

// Rows [oh0, oh0 + NR) with compile-time kernel height KH, row stride SH (unit dilation) and
// row count NR (<= 4): every index compile-time, so the accumulators stay in registers with no
// copies (a runtime row count's early exit cost GCC 12 register moves in every block).
template <int KH, int SH, int NR, class OutT>
static void dw_block(const DwCtx& c, const std::uint8_t* xp, int Wp, int oh0, int OW, OutT* out) {
  constexpr int NIN = (NR - 1) * SH + KH;  // input rows needed (never past the padded plane)
  const std::uint8_t* base = xp + static_cast<std::ptrdiff_t>(oh0 * SH) * Wp;
  for (int ow = 0; ow < OW; ow += 16) {
    const int valid = OW - ow < 16 ? OW - ow : 16;
    const __mmask64 m = valid == 16 ? c.lmask : ((1ull << ((valid - 1) * c.sw + c.kW)) - 1ull);
    const std::uint8_t* src = base + ow * c.sw;
    __m512i acc[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int j = 0; j < NIN; ++j) {
      const __m512i v = dw_prep(c, src + static_cast<std::ptrdiff_t>(j) * Wp, m);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const int kh = j - r * SH;
        if (kh >= 0 && kh < KH) acc[r] = _mm512_dpbusd_epi32(acc[r], v, c.wv[kh]);
      }
    }
    const __mmask16 om = col_mask(valid);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) dw_store(c, acc[r], out + static_cast<std::ptrdiff_t>(oh0 + r) * OW + ow, om);
  }
}

template <int KH, int SH, class OutT>
static void dw_rows(const DwCtx& c, const std::uint8_t* xp, int Wp, int OH, int OW, OutT* out) {
  int oh0 = 0;
  for (; oh0 + 4 <= OH; oh0 += 4) dw_block<KH, SH, 4, OutT>(c, xp, Wp, oh0, OW, out);
  switch (OH - oh0) {
    case 3: dw_block<KH, SH, 3, OutT>(c, xp, Wp, oh0, OW, out); break;
    case 2: dw_block<KH, SH, 2, OutT>(c, xp, Wp, oh0, OW, out); break;
    case 1: dw_block<KH, SH, 1, OutT>(c, xp, Wp, oh0, OW, out); break;
    default: break;
  }
}

template <class OutT>
static void depthwise_impl(const std::uint8_t* xp, int Wp, const std::int8_t* w, int kH, int kW, int sh, int sw,
                           int dh, int OH, int OW, std::int32_t wsum, std::int32_t zp, float a_scale, int oc,
                           const Epilogue& ep, OutT* out) {
  DwCtx c;
  for (int kh = 0; kh < kH; ++kh) {
    // the kernel row's bytes assembled in a register (byte stores read back as one 32-bit load
    // missed store forwarding: 16% of a 1024-channel 7x7 depthwise conv)
    std::uint32_t v = 0;
    for (int kw = 0; kw < kW; ++kw)
      v |= static_cast<std::uint32_t>(static_cast<std::uint8_t>(w[kh * kW + kw])) << (8 * kw);
    c.wv[kh] = _mm512_set1_epi32(static_cast<std::int32_t>(v));
  }
  c.perm = sw == 1 ? _mm512_setr_epi32(0, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4, 5, 3, 4, 5, 6)
                   : _mm512_setr_epi32(0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7, 8, 9);
  c.shuf = sw == 1 ? _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4, 5, 3, 4, 5, 6))
                   : _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7, 8, 9));
  // Bytes a full block of 16 outputs reads from one input row: at most 4 - kW past the padded
  // row (into the next row or the plane's slack); tail blocks read only their valid outputs' bytes.
  c.sw = sw;
  c.kW = kW;
  c.lmask = (1ull << (15 * sw + 4)) - 1ull;
  c.vs = _mm512_set1_ps(a_scale * ep.wscale[oc]);
  c.bias = ep.bias != nullptr;
  c.vb = _mm512_set1_ps(ep.bias ? ep.bias[oc] : 0.f);
  c.act = ep.act;
  c.lo = _mm512_set1_ps(ep.lo);
  c.hi = _mm512_set1_ps(ep.hi);
  c.corr = _mm512_set1_epi32(static_cast<std::int32_t>(static_cast<std::uint32_t>(zp) * static_cast<std::uint32_t>(wsum)));
  if constexpr (std::is_same_v<OutT, std::uint8_t>) {
    c.oq = QuantScale(ep.out_scale, ep.out_zp);
    if (QuantScale::foldable(ep.act, ep.lo, ep.hi)) {  // the activation folds into the clamp
      c.oq = c.oq.with_act(ep.act, ep.lo, ep.hi);
      c.act = Activation::None;
    }
  }
  if (kH == 3 && dh == 1 && (sh == 1 || sh == 2)) {
    if (sh == 1)
      dw_rows<3, 1, OutT>(c, xp, Wp, OH, OW, out);
    else
      dw_rows<3, 2, OutT>(c, xp, Wp, OH, OW, out);
    return;
  }
  for (int oh = 0; oh < OH; ++oh) {
    const std::uint8_t* row0 = xp + static_cast<std::ptrdiff_t>(oh * sh) * Wp;
    OutT* o = out + static_cast<std::ptrdiff_t>(oh) * OW;
    for (int ow = 0; ow < OW; ow += 16) {
      const int valid = OW - ow < 16 ? OW - ow : 16;
      const __mmask64 m = valid == 16 ? c.lmask : ((1ull << ((valid - 1) * sw + kW)) - 1ull);
      __m512i acc = _mm512_setzero_si512();
      for (int kh = 0; kh < kH; ++kh)
        acc = _mm512_dpbusd_epi32(acc, dw_prep(c, row0 + static_cast<std::ptrdiff_t>(kh * dh) * Wp + ow * sw, m), c.wv[kh]);
      dw_store(c, acc, o + ow, col_mask(valid));
    }
  }
}

static void depthwise(const std::uint8_t* xp, int Wp, const std::int8_t* w, int kH, int kW, int sh, int sw, int dh,
                      int dw, int OH, int OW, std::int32_t wsum, std::int32_t zp, float a_scale, int oc,
                      const Epilogue& ep, float* out, std::int32_t* scratch) {
  if (kW > 4 || dw != 1 || sw > 2 || kH > 16) {
    depthwise_generic(xp, Wp, w, kH, kW, sh, sw, dh, dw, OH, OW, wsum, zp, a_scale, oc, ep, out, scratch);
    return;
  }
  depthwise_impl<float>(xp, Wp, w, kH, kW, sh, sw, dh, OH, OW, wsum, zp, a_scale, oc, ep, out);
}

// u8 output requantized with ep.out_scale / ep.out_zp; false: this geometry has no u8 kernel.
static bool depthwise_u8(const std::uint8_t* xp, int Wp, const std::int8_t* w, int kH, int kW, int sh, int sw, int dh,
                         int dw, int OH, int OW, std::int32_t wsum, std::int32_t zp, float a_scale, int oc,
                         const Epilogue& ep, std::uint8_t* out) {
  if (kW > 4 || dw != 1 || sw > 2 || kH > 16) return false;
  depthwise_impl<std::uint8_t>(xp, Wp, w, kH, kW, sh, sw, dh, OH, OW, wsum, zp, a_scale, oc, ep, out);
  return true;
}

}  // namespace avx512_isa

const IsaOps& ops_avx512vnni() {
  static const IsaOps ops = [] {
    IsaOps o{Isa::Avx512Vnni, avx512_isa::kMR, avx512_isa::kNR, avx512_isa::kNB, avx512_isa::kKR, 1,
             avx512_isa::tile, avx512_isa::minmax, avx512_isa::quant, avx512_isa::depthwise};
    o.kernel = "avx512vnni";
    o.conv_direct = avx512_isa::conv_direct;
    o.conv_mt = avx512_isa::kCMR;
    o.conv_qt = 16 * avx512_isa::kCNB;
    o.conv_qmin = 16;
    o.conv_cg_align = 1;
    o.quant_pack4 = avx512_isa::quant_pack4;
    o.quant_plane = avx512_isa::quant_plane;
    o.pad_u8_plane = avx512_isa::pad_u8_plane;
    o.requant = avx512_isa::requant;
    o.depthwise_u8 = avx512_isa::depthwise_u8;
    return o;
  }();
  return ops;
}

}  // namespace detail
}  // namespace onnxopt
