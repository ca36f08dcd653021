// AVX2 micro-kernel, exact for any s8 weights. vpmaddubsw would saturate when two u8*s8 products
// sum past int16 (255*127*2 > 32767), so weights are packed pre-widened to s16 and multiplied with
// vpmaddwd (s16*s16 pairs summed into s32: exact). Compiled with -mavx2 -mfma; the output stage
// is the generic one (compiled with -ffp-contract=off like everything else).
//
// Packed B: panels of up to 2 blocks of 8 columns; per k-group of 2 rows a block is 8 columns x
// 2 k as s16 (32 bytes). A (u8) is broadcast 4 bytes at a time, widened, and split into the two
// k-pairs with vpshufd.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "internal.h"

namespace onnxopt {
namespace detail {
namespace avx2_isa {

#include "isa_generic.h"

constexpr int kMR = 4, kNR = 8, kNB = 2, kKR = 2;

template <int MR, int NB>
static void kernel(const Tile& t, const Epilogue& ep) {
  __m256i c[MR][NB];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NB; ++j) c[r][j] = _mm256_setzero_si256();
  const std::int16_t* B = static_cast<const std::int16_t*>(t.B);
  const int k4 = t.Kp / 4;
  for (int k = 0; k < k4; ++k) {
    __m256i b0[NB], b1[NB];
#pragma GCC unroll 2
    for (int j = 0; j < NB; ++j) {
      b0[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(B + j * 16));
      b1[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(B + NB * 16 + j * 16));
    }
    B += 2 * NB * 16;
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      std::int32_t av;
      std::memcpy(&av, t.A + static_cast<std::ptrdiff_t>(r) * t.lda + 4 * k, 4);
      const __m256i x = _mm256_cvtepu8_epi16(_mm_set1_epi32(av));
      const __m256i a01 = _mm256_shuffle_epi32(x, 0x00), a23 = _mm256_shuffle_epi32(x, 0x55);
#pragma GCC unroll 2
      for (int j = 0; j < NB; ++j) {
        c[r][j] = _mm256_add_epi32(c[r][j], _mm256_madd_epi16(a01, b0[j]));
        c[r][j] = _mm256_add_epi32(c[r][j], _mm256_madd_epi16(a23, b1[j]));
      }
    }
  }
  alignas(32) std::int32_t acc[MR][NB * kNR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NB; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(&acc[r][j * kNR]), c[r][j]);
  epilogue_generic(&acc[0][0], NB * kNR, t, ep);
}

using KernelFn = void (*)(const Tile&, const Epilogue&);
static const KernelFn kTable[kMR][kNB] = {
    {kernel<1, 1>, kernel<1, 2>},
    {kernel<2, 1>, kernel<2, 2>},
    {kernel<3, 1>, kernel<3, 2>},
    {kernel<4, 1>, kernel<4, 2>},
};

void tile(const Tile& t, const Epilogue& ep) { kTable[t.mr - 1][t.nb - 1](t, ep); }

void minmax(const float* x, std::size_t n, float* lo, float* hi) {
  __m256 l = _mm256_set1_ps(*lo), h = _mm256_set1_ps(*hi);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    l = _mm256_min_ps(v, l);
    h = _mm256_max_ps(v, h);
  }
  alignas(32) float lv[8], hv[8];
  _mm256_store_ps(lv, l);
  _mm256_store_ps(hv, h);
  float lo_ = lv[0], hi_ = hv[0];
  for (int k = 1; k < 8; ++k) {
    lo_ = lv[k] < lo_ ? lv[k] : lo_;
    hi_ = hv[k] > hi_ ? hv[k] : hi_;
  }
  minmax_generic(x + i, n - i, &lo_, &hi_);
  *lo = lo_;
  *hi = hi_;
}

void quant(const float* x, std::size_t n, float scale, float zpf, std::uint8_t* q) {
  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zpf);
  const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.f);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vz), zero), top);
    alignas(32) std::int32_t iv[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(iv), _mm256_cvttps_epi32(v));
    for (int k = 0; k < 8; ++k) q[i + k] = static_cast<std::uint8_t>(iv[k]);
  }
  quant_generic(x + i, n - i, scale, zpf, q + i);
}

}  // namespace avx2_isa

const IsaOps& ops_avx2() {
  static const IsaOps ops = [] {
    IsaOps o{Isa::Avx2, avx2_isa::kMR, avx2_isa::kNR, avx2_isa::kNB, avx2_isa::kKR, 2,
             avx2_isa::tile, avx2_isa::minmax, avx2_isa::quant, avx2_isa::depthwise_generic};
    o.requant = avx2_isa::requant_generic;
    return o;
  }();
  return ops;
}

}  // namespace detail
}  // namespace onnxopt
