// AVX512-VNNI micro-kernel (vpdpbusd), output stage, quantization. Compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512vnni; only reached after the runtime CPUID/XGETBV check.
//
// Packed B: panels of up to 4 blocks of 16 columns; per k-group of 4 rows a block is 64 bytes
// [16 columns][4 k], so one zmm load gives vpdpbusd its s8 operand. A (u8) is broadcast 4 bytes at
// a time. The micro-tile is 6 rows x 64 columns: 24 zmm accumulators + 4 B registers + 1 A.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "internal.h"

namespace onnxopt {
namespace detail {
namespace avx512_isa {

#include "isa_generic.h"

constexpr int kMR = 6, kNR = 16, kNB = 4, kKR = 4;

#include "avx512_epilogue.h"

template <int MR, int NB>
static void kernel(const Tile& t, const Epilogue& ep) {
  __m512i c[MR][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) c[r][j] = _mm512_setzero_si512();

  const std::int8_t* B = static_cast<const std::int8_t*>(t.B);
  const std::uint8_t* a[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a[r] = t.A + static_cast<std::ptrdiff_t>(r) * t.lda;
  const int kg = t.Kp / kKR;
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
    for (int r = 0; r < MR; ++r) finish_vec(c[r][j], r, j, t, ep, csum, wzp, ws, bias, mask, ybuf);
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

static inline __m128i quant16(__m512 x, __m512 vs, __m512 vz) {
  __m512 q = _mm512_roundscale_ps(_mm512_div_ps(x, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_add_ps(q, vz);
  q = _mm512_max_ps(q, _mm512_setzero_ps());
  q = _mm512_min_ps(q, _mm512_set1_ps(255.f));
  return _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(q));
}

void quant(const float* x, std::size_t n, float scale, float zpf, std::uint8_t* q) {
  const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(zpf);
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), quant16(_mm512_loadu_ps(x + i), vs, vz));
  if (i < n) {
    const __mmask16 m = col_mask(static_cast<int>(n - i));
    _mm_mask_storeu_epi8(q + i, m, quant16(_mm512_maskz_loadu_ps(m, x + i), vs, vz));
  }
}

}  // namespace avx512_isa

const IsaOps& ops_avx512vnni() {
  static const IsaOps ops{Isa::Avx512Vnni, avx512_isa::kMR, avx512_isa::kNR, avx512_isa::kNB, avx512_isa::kKR, 1,
                          avx512_isa::tile, avx512_isa::minmax, avx512_isa::quant,
                          avx512_isa::depthwise_generic};
  return ops;
}

}  // namespace detail
}  // namespace onnxopt
