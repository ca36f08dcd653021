// AVX2 micro-kernels, two of them, both exact (compiled with -mavx2 -mfma, -ffp-contract=off like
// everything else):
//
// - u8 (ops_avx2_u8): vpmaddubsw + vpmaddwd(ones) + vpaddd, the VNNI layout on ymm: per k-group of
//   4 a block is [8 columns][4 k] s8 (32 bytes), A broadcast 4 bytes at a time. vpmaddubsw sums two
//   u8*s8 products into s16 with saturation, so pack_b picks this kernel only when no column has a
//   k-pair (2i, 2i+1) whose positive (or negative) weights sum past 128 in magnitude: then
//   |255 * (w0 + w1)| <= 32640 and nothing saturates (every 7-bit weight set qualifies).
// - s16 (ops_avx2): any s8 weights, packed pre-widened to s16 and multiplied with vpmaddwd
//   (s16*s16 pairs summed into s32); per k-group of 2 rows a block is 8 columns x 2 k as s16
//   (32 bytes); A is broadcast 4 bytes at a time, widened, and split into the k-pairs with vpshufd.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "internal.h"

namespace onnxopt {
namespace detail {
namespace avx2_isa {

#include "isa_generic.h"

constexpr int kMR = 4, kNR = 8, kNB = 2, kKR = 2;

// Output stage of an int32 tile acc[mr][ld] (columns relative to t.n), 8 columns per step: the
// same float operations in the same order as epilogue_generic. Row-major output is stored from
// the vectors; other layouts element by element.
static void epilogue_avx2(const std::int32_t* acc, int ld, const Tile& t, const Epilogue& ep) {
  const __m256i kz_step = _mm256_set1_epi32(ep.K);
  for (int j = 0; j < t.ncols; j += 8) {
    const int n = t.n + j, valid = t.ncols - j < 8 ? t.ncols - j : 8;
    const __m256i vmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i csum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ep.colsum + n));  // [Np]: no over-read
    const __m256i wzp = ep.wzp ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ep.wzp + n)) : _mm256_setzero_si256();
    const __m256 ws = _mm256_maskload_ps(ep.wscale + n, vmask);
    const __m256 bias = ep.bias ? _mm256_maskload_ps(ep.bias + n, vmask) : _mm256_setzero_ps();
    for (int r = 0; r < t.mr; ++r) {
      const __m256i rzp = _mm256_set1_epi32(t.rzp[r]);
      __m256i v = _mm256_sub_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(acc + r * ld + j)),
                                   _mm256_mullo_epi32(rzp, csum));
      if (ep.wzp) {
        v = _mm256_sub_epi32(v, _mm256_mullo_epi32(wzp, _mm256_set1_epi32(t.rsum[r])));
        v = _mm256_add_epi32(v, _mm256_mullo_epi32(_mm256_mullo_epi32(kz_step, rzp), wzp));
      }
      const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(t.rscale[r]), ws);
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(v), sc);
      if (ep.bias) y = _mm256_add_ps(y, bias);
      if (ep.act == Activation::Relu) {
        y = _mm256_max_ps(y, _mm256_setzero_ps());
      } else if (ep.act == Activation::Clip) {
        y = _mm256_max_ps(y, _mm256_set1_ps(ep.lo));
        y = _mm256_min_ps(y, _mm256_set1_ps(ep.hi));
      }
      const std::ptrdiff_t off = static_cast<std::ptrdiff_t>(t.m + r) * ep.ldm + static_cast<std::ptrdiff_t>(n) * ep.ldn;
      if (ep.ldn == 1 && ep.requant) {
        __m256 q = _mm256_round_ps(_mm256_div_ps(y, _mm256_set1_ps(ep.out_scale)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_add_ps(q, _mm256_set1_ps(ep.out_zp));
        q = _mm256_max_ps(q, _mm256_setzero_ps());
        q = _mm256_min_ps(q, _mm256_set1_ps(255.f));
        const __m256i qi = _mm256_cvttps_epi32(q);
        const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
        const __m128i b8 = _mm_packus_epi16(w16, w16);
        if (valid == 8) {
          _mm_storel_epi64(reinterpret_cast<__m128i*>(ep.cu + off), b8);
        } else {
          alignas(16) std::uint8_t tmp[16];
          _mm_store_si128(reinterpret_cast<__m128i*>(tmp), b8);
          std::memcpy(ep.cu + off, tmp, static_cast<std::size_t>(valid));
        }
      } else if (ep.ldn == 1) {
        _mm256_maskstore_ps(ep.cf + off, vmask, y);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, y);
        for (int i = 0; i < valid; ++i) store_element(tmp[i], off + static_cast<std::ptrdiff_t>(i) * ep.ldn, ep);
      }
    }
  }
}

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
  epilogue_avx2(&acc[0][0], NB * kNR, t, ep);
}

// u8 kernel: the dot products in a function of their own (see dot_tile in kernel_avx512vnni.cpp).
constexpr int kMRu = 4, kNBu = 2, kKRu = 4;

template <int MR, int NB>
[[gnu::noinline]] static void dot_tile_u8(const std::uint8_t* A, int lda, const std::int8_t* B, int kg,
                                          std::int32_t (&acc)[MR][NB * kNR]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c[MR][NB];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NB; ++j) c[r][j] = _mm256_setzero_si256();
  for (int k = 0; k < kg; ++k) {
    __m256i b[NB];
#pragma GCC unroll 2
    for (int j = 0; j < NB; ++j) b[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(B + j * 32));
    B += NB * 32;
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      std::int32_t av;
      std::memcpy(&av, A + static_cast<std::ptrdiff_t>(r) * lda + k * kKRu, 4);
      const __m256i va = _mm256_set1_epi32(av);
#pragma GCC unroll 2
      for (int j = 0; j < NB; ++j)
        c[r][j] = _mm256_add_epi32(c[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(va, b[j]), ones));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NB; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(&acc[r][j * kNR]), c[r][j]);
}

template <int MR, int NB>
static void kernel_u8(const Tile& t, const Epilogue& ep) {
  alignas(32) std::int32_t acc[MR][NB * kNR];
  dot_tile_u8<MR, NB>(t.A, t.lda, static_cast<const std::int8_t*>(t.B), t.Kp / kKRu, acc);
  epilogue_avx2(&acc[0][0], NB * kNR, t, ep);
}

using KernelFn = void (*)(const Tile&, const Epilogue&);
static const KernelFn kTableU8[kMRu][kNBu] = {
    {kernel_u8<1, 1>, kernel_u8<1, 2>},
    {kernel_u8<2, 1>, kernel_u8<2, 2>},
    {kernel_u8<3, 1>, kernel_u8<3, 2>},
    {kernel_u8<4, 1>, kernel_u8<4, 2>},
};

void tile_u8(const Tile& t, const Epilogue& ep) { kTableU8[t.mr - 1][t.nb - 1](t, ep); }

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
    o.kernel = "avx2-s16";
    return o;
  }();
  return ops;
}

const IsaOps& ops_avx2_u8() {
  static const IsaOps ops = [] {
    IsaOps o = ops_avx2();
    o.MR = avx2_isa::kMRu;
    o.NB = avx2_isa::kNBu;
    o.KR = avx2_isa::kKRu;
    o.elem = 1;
    o.tile = avx2_isa::tile_u8;
    o.kernel = "avx2-u8";
    return o;
  }();
  return ops;
}

}  // namespace detail
}  // namespace onnxopt
