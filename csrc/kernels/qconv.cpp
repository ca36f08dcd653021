// int8 conv2d, NCHW float in / float out, on top of the GEMM driver.
//
// GEMM view per image and group: rows = output pixels, K = C/group * kH * kW, columns = output
// channels; the output stage stores transposed (column stride OH*OW) so Y stays NCHW.
//  * 1x1, stride 1, no padding: A rows are read straight from X, quantized and transposed into the
//    packed A block (each input element is used once, so it is quantized once, in the fill).
//  * general: the image is quantized once into a zero-point padded u8 copy (every input element is
//    used kH*kW times; quantizing once saves the divisions), then im2col gathers from it into
//    the packed A block per row block, inside the GEMM task.
//  * depthwise (one input channel per group): direct convolution on the padded u8 plane.
//  * stride 1 on ISAs with a direct conv kernel (AVX512-VNNI, AMX): implicit GEMM with output
//    channels as rows and pixels as columns (see DirectConv in internal.h), no im2col, the
//    output stored straight into NCHW.
//  * 1x1 unpadded convs with a stride on those ISAs: the same direct kernel on the subsampled
//    image (only the pixels the conv reads are quantized and packed, the image is OH x OW).
#include <emmintrin.h>

#include <algorithm>
#include <mutex>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "driver.h"

namespace onnxopt {
namespace detail {
namespace {

class PackedConvImpl final : public PackedConv {
 public:
  const ConvParams& params() const override { return p; }
  ConvParams p;
  const IsaOps* ops = nullptr;
  bool depthwise = false;
  std::vector<std::shared_ptr<PackedB>> groups;  // GEMM path
  std::vector<std::int8_t> dw_w;                 // depthwise: [M][kH*kW]
  std::vector<std::int32_t> dw_sum;              // depthwise and direct: [M]
  // Direct path: per group [Mp][Kd] weights, back to back.
  bool direct = false;
  // Interleaved im2col (group 1, at most 4 input channels, e.g. an RGB stem): the image is
  // quantized into [Hp][Wp][4] pixels (channels past C hold the zero point, their weights are
  // zero) and the GEMM's K runs (kh, kw, c4), so an im2col row is kH copies of kW * 4 contiguous
  // bytes instead of C * kH copies of kW bytes.
  bool il = false;
  int CGp = 0, Kd = 0, Mp = 0;
  AlignedBuf<std::int8_t> d_w;
  // Space-to-depth (stride 2x2, few input channels): the direct kernel runs a stride-1 conv with a
  // ceil(k/2) kernel over the four phase images of the zero-point padded input, the phases of input
  // channel c being channels 4c..4c+3 (one channel group: (row, col) parity 00, 01, 10, 11).
  bool s2d = false;
  int dkH = 1, dkW = 1;  // the direct kernel's size (= kH, kW unless s2d)

  // Small images on the direct path (see direct_pays): the GEMM path's packed weights, made from
  // d_w on the first such call (pack time does not know the image size; most layers never need it).
  const std::vector<std::shared_ptr<PackedB>>& small_image_groups() const {
    std::call_once(gemm_once, [this] {
      const int Cg = p.C / p.group, Mg = p.M / p.group, taps = p.kH * p.kW, Kg = Cg * taps;
      std::vector<std::int8_t> wg(static_cast<std::size_t>(Mg) * Kg);  // [Mg][Cg][kH][kW], im2col's k order
      for (int g = 0; g < p.group; ++g) {
        const std::int8_t* src = d_w.get() + static_cast<std::size_t>(g) * Mp * Kd;
        for (int oc = 0; oc < Mg; ++oc)
          for (int c = 0; c < Cg; ++c)
            for (int t = 0; t < taps; ++t)
              wg[(static_cast<std::size_t>(oc) * Cg + c) * taps + t] =
                  src[static_cast<std::size_t>(oc) * Kd + (t * CGp + c / 4) * 4 + c % 4];
        gemm_groups.push_back(pack_b(wg.data(), Kg, Mg, 1, Kg, ops->isa, nullptr));
      }
    });
    return gemm_groups;
  }

 private:
  mutable std::once_flag gemm_once;
  mutable std::vector<std::shared_ptr<PackedB>> gemm_groups;
};

struct ConvCtx {
  const PackedConvImpl* w;
  const float* X;  // this image
  const std::uint8_t* Xp;  // padded u8 image (general and depthwise paths)
  int H, W, Hp, Wp, OH, OW;
  float scale, zpf;
  int g;  // current group
  Epilogue ep;
  float* Y;  // this image
  const float* R;  // residual of this image (laid out like Y) or null; then ep.act is None and
  Activation act;  // act/lo/hi are applied after adding R
  float lo, hi;
  // u8 activations: Xu (this image, already quantized with scale/zpf) replaces X; Yu receives the
  // requantized output (out_scale/out_zp). Paths that produce float planes write them to Y (then
  // a staging buffer) and requantize each plane after its residual and activation.
  const std::uint8_t* Xu;
  std::uint8_t* Yu;
  float out_scale, out_zp;
};

// 4 u8 channel rows (null: the zero point) -> n interleaved 4-byte pixels, SSE2 unpacks.
void interleave4_u8(const std::uint8_t* const* x, int n, std::uint8_t z, std::uint8_t* dst) {
  std::vector<std::uint8_t> zrow;
  const std::uint8_t* r[4];
  for (int j = 0; j < 4; ++j) {
    if (x[j] == nullptr) {
      if (zrow.empty()) zrow.assign(static_cast<std::size_t>(n), z);
      r[j] = zrow.data();
    } else {
      r[j] = x[j];
    }
  }
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[0] + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[1] + i));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[2] + i));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[3] + i));
    const __m128i ab0 = _mm_unpacklo_epi8(a, b), ab1 = _mm_unpackhi_epi8(a, b);
    const __m128i cd0 = _mm_unpacklo_epi8(c, d), cd1 = _mm_unpackhi_epi8(c, d);
    __m128i* o = reinterpret_cast<__m128i*>(dst + static_cast<std::ptrdiff_t>(i) * 4);
    _mm_storeu_si128(o, _mm_unpacklo_epi16(ab0, cd0));
    _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(ab0, cd0));
    _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(ab1, cd1));
    _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(ab1, cd1));
  }
  for (; i < n; ++i)
    for (int j = 0; j < 4; ++j) dst[static_cast<std::ptrdiff_t>(i) * 4 + j] = r[j][i];
}

// y = act(y + r) over one channel plane: the residual and activation of the output stage for the
// paths whose inner kernels apply only scale and bias (same float operations, same order).
void residual_act(float* __restrict y, const float* __restrict r, std::size_t n, Activation act, float lo, float hi) {
  if (act == Activation::Relu) {
    for (std::size_t i = 0; i < n; ++i) {
      const float v = y[i] + r[i];
      y[i] = v > 0.f ? v : 0.f;
    }
  } else if (act == Activation::Clip) {
    for (std::size_t i = 0; i < n; ++i) {
      float v = y[i] + r[i];
      v = v > lo ? v : lo;
      y[i] = v < hi ? v : hi;
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) y[i] = y[i] + r[i];
  }
}

// After a float-producing path: residual + activation (when R), then requantization (when Yu),
// one output channel plane per task.
void finish_task(void* data, std::size_t i) {
  const ConvCtx& c = *static_cast<const ConvCtx*>(data);
  const std::size_t plane = static_cast<std::size_t>(c.OH) * c.OW;
  if (c.R) residual_act(c.Y + i * plane, c.R + i * plane, plane, c.act, c.lo, c.hi);
  if (c.Yu) c.w->ops->requant(c.Y + i * plane, plane, c.out_scale, c.out_zp, c.Yu + i * plane);
}

void fill_1x1(const void* vctx, int m0, int mb, std::uint8_t* buf, int ldb, std::int32_t* zp, float* scale) {
  const ConvCtx& c = *static_cast<const ConvCtx*>(vctx);
  const int Cg = c.w->p.C / c.w->p.group;
  const std::size_t plane = static_cast<std::size_t>(c.H) * c.W;
  std::vector<std::uint8_t> tmp(c.Xu ? 0 : static_cast<std::size_t>(mb) * 4);
  const auto channel = [&](int ci, std::uint8_t* t) -> const std::uint8_t* {
    if (c.Xu) return c.Xu + static_cast<std::size_t>(c.g * Cg + ci) * plane + m0;
    c.w->ops->quant(c.X + static_cast<std::size_t>(c.g * Cg + ci) * plane + m0, mb, c.scale, c.zpf, t);
    return t;
  };
  int ci = 0;
  // 4 channels at a time, one 4-byte store per pixel: the byte-by-byte strided transpose was the
  // hottest loop of a 1x1 conv on the im2col ISAs (AVX2)
  for (; ci + 4 <= Cg; ci += 4) {
    const std::uint8_t* q[4];
    for (int i = 0; i < 4; ++i) q[i] = channel(ci + i, tmp.data() + static_cast<std::size_t>(i) * mb);
    for (int r = 0; r < mb; ++r) {
      const std::uint32_t v = static_cast<std::uint32_t>(q[0][r]) | static_cast<std::uint32_t>(q[1][r]) << 8 |
                              static_cast<std::uint32_t>(q[2][r]) << 16 | static_cast<std::uint32_t>(q[3][r]) << 24;
      std::memcpy(buf + static_cast<std::size_t>(r) * ldb + ci, &v, 4);  // little-endian: channel order
    }
  }
  for (; ci < Cg; ++ci) {
    const std::uint8_t* q = channel(ci, tmp.data());
    for (int r = 0; r < mb; ++r) buf[static_cast<std::size_t>(r) * ldb + ci] = q[r];
  }
  for (int r = 0; r < mb; ++r) {
    zp[r] = static_cast<std::int32_t>(c.zpf);
    scale[r] = c.scale;
  }
}

// im2col rows for kernels of width KW with unit width-dilation: constant-size copies from the
// Cg * kH source rows of a pixel's window (their offsets computed once per block).
template <int KW>
void im2col_rows(const ConvCtx& c, int m0, int mb, std::uint8_t* buf, int ldb) {
  const ConvParams& p = c.w->p;
  const int Cg = p.C / p.group, nseg = Cg * p.kH;
  const std::size_t plane = static_cast<std::size_t>(c.Hp) * c.Wp;
  std::ptrdiff_t seg_stack[64];
  std::vector<std::ptrdiff_t> seg_heap(nseg > 64 ? nseg : 0);
  std::ptrdiff_t* seg = nseg > 64 ? seg_heap.data() : seg_stack;
  for (int ci = 0; ci < Cg; ++ci)
    for (int kh = 0; kh < p.kH; ++kh)
      seg[ci * p.kH + kh] = static_cast<std::ptrdiff_t>(ci * plane) + static_cast<std::ptrdiff_t>(kh) * p.dil_h * c.Wp;
  const std::uint8_t* const img = c.Xp + static_cast<std::size_t>(c.g * Cg) * plane;
  // Every segment but a row's last is copied with one wider move whose extra bytes the next copy
  // overwrites (the source over-read stays in the plane buffer's slack); the last copy is exact,
  // so nothing past K is written.
  constexpr int kWide = KW <= 4 ? 4 : 8;
  int oh = m0 / c.OW, ow = m0 % c.OW;
  for (int r = 0; r < mb; ++r) {
    std::uint8_t* dst = buf + static_cast<std::size_t>(r) * ldb;
    const std::uint8_t* base = img + static_cast<std::size_t>(oh * p.stride_h) * c.Wp + ow * p.stride_w;
    if (KW == 1) {
      for (int j = 0; j < nseg; ++j) dst[j] = base[seg[j]];
    } else {
      for (int j = 0; j + 1 < nseg; ++j) std::memcpy(dst + j * KW, base + seg[j], kWide);
      std::memcpy(dst + (nseg - 1) * KW, base + seg[nseg - 1], KW);
    }
    if (++ow == c.OW) ow = 0, ++oh;
  }
}

// Interleaved im2col rows (PackedConvImpl::il): per kernel row, kW 4-byte pixels from the
// interleaved image; wide overlapping copies as in im2col_rows.
template <int KW>
void im2col_il_rows(const ConvCtx& c, int m0, int mb, std::uint8_t* buf, int ldb) {
  const ConvParams& p = c.w->p;
  constexpr int kSeg = KW * 4, kWide = kSeg <= 8 ? 8 : kSeg <= 16 ? 16 : 32;
  const std::ptrdiff_t row_step = static_cast<std::ptrdiff_t>(p.dil_h) * c.Wp * 4;
  int oh = m0 / c.OW, ow = m0 % c.OW;
  for (int r = 0; r < mb; ++r) {
    std::uint8_t* dst = buf + static_cast<std::size_t>(r) * ldb;
    const std::uint8_t* src = c.Xp + (static_cast<std::ptrdiff_t>(oh) * p.stride_h * c.Wp + ow * p.stride_w) * 4;
    for (int kh = 0; kh + 1 < p.kH; ++kh, dst += kSeg, src += row_step) std::memcpy(dst, src, kWide);
    std::memcpy(dst, src, kSeg);
    if (++ow == c.OW) ow = 0, ++oh;
  }
}

void fill_im2col(const void* vctx, int m0, int mb, std::uint8_t* buf, int ldb, std::int32_t* zp, float* scale) {
  const ConvCtx& c = *static_cast<const ConvCtx*>(vctx);
  const ConvParams& p = c.w->p;
  if (c.w->il) {
    switch (p.kW) {
      case 2: im2col_il_rows<2>(c, m0, mb, buf, ldb); break;
      case 3: im2col_il_rows<3>(c, m0, mb, buf, ldb); break;
      case 4: im2col_il_rows<4>(c, m0, mb, buf, ldb); break;
      case 5: im2col_il_rows<5>(c, m0, mb, buf, ldb); break;
      case 6: im2col_il_rows<6>(c, m0, mb, buf, ldb); break;
      case 7: im2col_il_rows<7>(c, m0, mb, buf, ldb); break;
      default: im2col_il_rows<1>(c, m0, mb, buf, ldb); break;  // kW 1 (il needs kW <= 7)
    }
    for (int r = 0; r < mb; ++r) {
      zp[r] = static_cast<std::int32_t>(c.zpf);
      scale[r] = c.scale;
    }
    return;
  }
  if (p.dil_w == 1 && (p.kW == 1 || p.kW == 3 || p.kW == 5 || p.kW == 7)) {
    switch (p.kW) {
      case 1: im2col_rows<1>(c, m0, mb, buf, ldb); break;
      case 3: im2col_rows<3>(c, m0, mb, buf, ldb); break;
      case 5: im2col_rows<5>(c, m0, mb, buf, ldb); break;
      default: im2col_rows<7>(c, m0, mb, buf, ldb); break;
    }
    for (int r = 0; r < mb; ++r) {
      zp[r] = static_cast<std::int32_t>(c.zpf);
      scale[r] = c.scale;
    }
    return;
  }
  const int Cg = p.C / p.group;
  const std::size_t plane = static_cast<std::size_t>(c.Hp) * c.Wp;
  for (int r = 0; r < mb; ++r) {
    const int pix = m0 + r, oh = pix / c.OW, ow = pix % c.OW;
    std::uint8_t* dst = buf + static_cast<std::size_t>(r) * ldb;
    const std::uint8_t* base = c.Xp + static_cast<std::size_t>(c.g * Cg) * plane +
                               static_cast<std::size_t>(oh * p.stride_h) * c.Wp + ow * p.stride_w;
    for (int ci = 0; ci < Cg; ++ci, base += plane) {
      for (int kh = 0; kh < p.kH; ++kh) {
        const std::uint8_t* src = base + static_cast<std::size_t>(kh * p.dil_h) * c.Wp;
        for (int kw = 0; kw < p.kW; ++kw) *dst++ = src[kw * p.dil_w];
      }
    }
    zp[r] = static_cast<std::int32_t>(c.zpf);
    scale[r] = c.scale;
  }
}

// Quantize channel ci of the image into a zero-point padded plane.
void pad_quant_plane(const ConvCtx& c, std::size_t ci, std::uint8_t* dst) {
  const ConvParams& p = c.w->p;
  const std::uint8_t z = static_cast<std::uint8_t>(c.zpf);
  if (c.Xu) {  // already quantized: zero-point fill and row copies
    const std::uint8_t* x = c.Xu + ci * static_cast<std::size_t>(c.H) * c.W;
    if (c.w->ops->pad_u8_plane) {
      c.w->ops->pad_u8_plane(x, c.H, c.W, p.pad_top, p.pad_left, c.Hp, c.Wp, z, dst);
      return;
    }
    std::memset(dst, z, static_cast<std::size_t>(c.Hp) * c.Wp);
    for (int h = 0; h < c.H; ++h)
      std::memcpy(dst + static_cast<std::size_t>(p.pad_top + h) * c.Wp + p.pad_left, x + static_cast<std::size_t>(h) * c.W,
                  static_cast<std::size_t>(c.W));
    return;
  }
  const float* x = c.X + ci * static_cast<std::size_t>(c.H) * c.W;
  if (c.w->ops->quant_plane) {  // one zero-point fill of the small plane, then every row in one call
    std::memset(dst, z, static_cast<std::size_t>(c.Hp) * c.Wp);
    c.w->ops->quant_plane(x, c.H, c.W, c.scale, c.zpf, dst + static_cast<std::size_t>(p.pad_top) * c.Wp + p.pad_left, c.Wp);
    return;
  }
  std::memset(dst, z, static_cast<std::size_t>(p.pad_top) * c.Wp);
  std::memset(dst + static_cast<std::size_t>(p.pad_top + c.H) * c.Wp, z, static_cast<std::size_t>(p.pad_bottom) * c.Wp);
  for (int h = 0; h < c.H; ++h) {
    std::uint8_t* row = dst + static_cast<std::size_t>(p.pad_top + h) * c.Wp;
    std::memset(row, z, p.pad_left);
    c.w->ops->quant(x + static_cast<std::size_t>(h) * c.W, c.W, c.scale, c.zpf, row + p.pad_left);
    std::memset(row + p.pad_left + c.W, z, p.pad_right);
  }
}

// Tasks run channels last to first: the per-image min/max pass has just read the image front to
// back, so its tail is the part most likely still in cache.
void pad_quant_task(void* data, std::size_t i) {
  const ConvCtx& c = *static_cast<const ConvCtx*>(data);
  const std::size_t ci = static_cast<std::size_t>(c.w->p.C) - 1 - i;
  pad_quant_plane(c, ci, const_cast<std::uint8_t*>(c.Xp) + ci * static_cast<std::size_t>(c.Hp) * c.Wp);
}

// Depthwise: a task takes a run of channels; per channel, quantize it into a task-local padded
// plane and convolve it at once (the buffers are allocated once per task, not per channel).
struct DwJob {
  const ConvCtx* c;
  int per_task;  // channels per task
};

void depthwise_task(void* data, std::size_t t) {
  const DwJob& job = *static_cast<const DwJob*>(data);
  const ConvCtx& c = *job.c;
  const ConvParams& p = c.w->p;
  const int Mg = p.M / p.group;
  auto plane = aligned_alloc_n<std::uint8_t>(static_cast<std::size_t>(c.Hp) * c.Wp);
  const std::uint8_t* xp = plane.get();
  std::vector<std::int32_t> scratch(static_cast<std::size_t>(c.OW) + 64);
  const std::size_t oplane = static_cast<std::size_t>(c.OH) * c.OW;
  AlignedBuf<float> yf;  // u8 output without a u8 kernel: the float plane, requantized once complete
  Epilogue ep_u8 = c.ep;   // u8 output: the same stage requantized with the output's parameters
  ep_u8.out_scale = c.out_scale;
  ep_u8.out_zp = c.out_zp;
  const bool u8_kernel = c.Yu && !c.R && c.w->ops->depthwise_u8;
  const std::size_t begin = t * job.per_task, end = std::min<std::size_t>(p.C, begin + job.per_task);
  for (std::size_t i = begin; i < end; ++i) {
    const std::size_t ci = static_cast<std::size_t>(p.C) - 1 - i;
    pad_quant_plane(c, ci, plane.get());
    for (int j = 0; j < Mg; ++j) {
      const int oc = static_cast<int>(ci) * Mg + j;
      const std::int8_t* w = c.w->dw_w.data() + static_cast<std::size_t>(oc) * p.kH * p.kW;
      if (u8_kernel && c.w->ops->depthwise_u8(xp, c.Wp, w, p.kH, p.kW, p.stride_h, p.stride_w, p.dil_h, p.dil_w,
                                              c.OH, c.OW, c.w->dw_sum[oc], static_cast<std::int32_t>(c.zpf),
                                              c.scale, oc, ep_u8, c.Yu + oc * oplane))
        continue;
      if (c.Yu && !yf) yf = aligned_alloc_n<float>(oplane);
      float* y = c.Yu ? yf.get() : c.Y + oc * oplane;
      c.w->ops->depthwise(xp, c.Wp, w, p.kH, p.kW, p.stride_h, p.stride_w, p.dil_h, p.dil_w, c.OH, c.OW,
                          c.w->dw_sum[oc], static_cast<std::int32_t>(c.zpf), c.scale, oc, c.ep, y, scratch.data());
      if (c.R) residual_act(y, c.R + oc * oplane, oplane, c.act, c.lo, c.hi);
      if (c.Yu) c.w->ops->requant(y, oplane, c.out_scale, c.out_zp, c.Yu + oc * oplane);
    }
  }
}

// Direct path: quantize 4 channels of the image into one channel-group plane [L][4].
struct PackCtx {
  const ConvCtx* c;
  std::uint8_t* Xq;  // [group * CGp][L][4]
  std::ptrdiff_t L;
};

void direct_pack_task(void* data, std::size_t i) {
  const PackCtx& k = *static_cast<const PackCtx*>(data);
  const ConvCtx& c = *k.c;
  const PackedConvImpl& w = *c.w;
  const ConvParams& p = w.p;
  const int Cg = p.C / p.group;
  i = static_cast<std::size_t>(p.group) * w.CGp - 1 - i;  // last to first, as pad_quant_task
  const int g = static_cast<int>(i) / w.CGp, cg = static_cast<int>(i) % w.CGp;
  std::uint8_t* dst = k.Xq + static_cast<std::ptrdiff_t>(i) * k.L * 4;
  const std::uint8_t z = static_cast<std::uint8_t>(c.zpf);
  if (cg * 4 >= Cg) {  // padding channel group (zero weights): any value, keep it defined
    std::memset(dst, z, static_cast<std::size_t>(k.L) * 4);
    return;
  }
  const std::size_t plane = static_cast<std::size_t>(c.H) * c.W;
  if (c.Xu) {
    const std::uint8_t* x[4];
    for (int j = 0; j < 4; ++j)
      x[j] = cg * 4 + j < Cg ? c.Xu + static_cast<std::size_t>(g * Cg + cg * 4 + j) * plane : nullptr;
    std::memset(dst, z, static_cast<std::size_t>(k.L) * 4);
    if (p.pad_left == 0 && p.pad_right == 0) {
      interleave4_u8(x, c.H * c.W, z, dst + static_cast<std::size_t>(p.pad_top) * c.Wp * 4);
    } else {
      for (int h = 0; h < c.H; ++h) {
        const std::uint8_t* xr[4];
        for (int j = 0; j < 4; ++j) xr[j] = x[j] ? x[j] + static_cast<std::size_t>(h) * c.W : nullptr;
        interleave4_u8(xr, c.W, z, dst + (static_cast<std::size_t>(p.pad_top + h) * c.Wp + p.pad_left) * 4);
      }
    }
    return;
  }
  const float* x[4];
  for (int j = 0; j < 4; ++j)
    x[j] = cg * 4 + j < Cg ? c.X + static_cast<std::size_t>(g * Cg + cg * 4 + j) * plane : nullptr;
  std::memset(dst, z, static_cast<std::size_t>(p.pad_top) * c.Wp * 4);
  if (p.pad_left == 0 && p.pad_right == 0) {
    w.ops->quant_pack4(x, c.H * c.W, c.scale, c.zpf, dst + static_cast<std::size_t>(p.pad_top) * c.Wp * 4);
  } else {
    for (int h = 0; h < c.H; ++h) {
      std::uint8_t* row = dst + static_cast<std::size_t>(p.pad_top + h) * c.Wp * 4;
      std::memset(row, z, static_cast<std::size_t>(p.pad_left) * 4);
      const float* xr[4];
      for (int j = 0; j < 4; ++j) xr[j] = x[j] ? x[j] + static_cast<std::size_t>(h) * c.W : nullptr;
      w.ops->quant_pack4(xr, c.W, c.scale, c.zpf, row + static_cast<std::size_t>(p.pad_left) * 4);
      std::memset(row + static_cast<std::size_t>(p.pad_left + c.W) * 4, z, static_cast<std::size_t>(p.pad_right) * 4);
    }
  }
  const std::size_t used = static_cast<std::size_t>(p.pad_top + c.H) * c.Wp * 4;
  std::memset(dst + used, z, static_cast<std::size_t>(k.L) * 4 - used);
}

// All pack tasks of the direct path on one thread (the prologue of run_after).
struct PackAll {
  void (*fn)(void*, std::size_t);
  std::size_t n;
  PackCtx* pk;
};

void pack_all(void* data) {
  const PackAll& a = *static_cast<const PackAll*>(data);
  for (std::size_t i = 0; i < a.n; ++i) a.fn(a.pk, i);
}

// 1x1 strided direct path: the subsampled image (OH x OW pixels, no padding) is packed like a
// stride-1 image, reading every stride-th float of every stride-th row.
void direct_pack_strided_task(void* data, std::size_t i) {
  const PackCtx& k = *static_cast<const PackCtx*>(data);
  const ConvCtx& c = *k.c;
  const PackedConvImpl& w = *c.w;
  const ConvParams& p = w.p;
  const int Cg = p.C / p.group;
  i = static_cast<std::size_t>(p.group) * w.CGp - 1 - i;
  const int g = static_cast<int>(i) / w.CGp, cg = static_cast<int>(i) % w.CGp;
  std::uint8_t* dst = k.Xq + static_cast<std::ptrdiff_t>(i) * k.L * 4;
  const std::uint8_t z = static_cast<std::uint8_t>(c.zpf);
  const std::size_t used = static_cast<std::size_t>(c.OH) * c.OW * 4;
  if (cg * 4 >= Cg) {
    std::memset(dst, z, static_cast<std::size_t>(k.L) * 4);
    return;
  }
  const std::size_t plane = static_cast<std::size_t>(c.H) * c.W;
  if (c.Xu) {
    std::vector<std::uint8_t> rows(static_cast<std::size_t>(4) * c.OW);
    for (int oh = 0; oh < c.OH; ++oh) {
      const std::uint8_t* xr[4];
      for (int j = 0; j < 4; ++j) {
        xr[j] = nullptr;
        if (cg * 4 + j >= Cg) continue;
        const std::uint8_t* src = c.Xu + static_cast<std::size_t>(g * Cg + cg * 4 + j) * plane +
                                  static_cast<std::size_t>(oh) * p.stride_h * c.W;
        std::uint8_t* r = rows.data() + static_cast<std::size_t>(j) * c.OW;
        for (int ow = 0; ow < c.OW; ++ow) r[ow] = src[static_cast<std::size_t>(ow) * p.stride_w];
        xr[j] = r;
      }
      interleave4_u8(xr, c.OW, z, dst + static_cast<std::size_t>(oh) * c.OW * 4);
    }
    std::memset(dst + used, z, static_cast<std::size_t>(k.L) * 4 - used);
    return;
  }
  std::vector<float> rows(static_cast<std::size_t>(4) * c.OW);
  for (int oh = 0; oh < c.OH; ++oh) {
    const float* xr[4];
    for (int j = 0; j < 4; ++j) {
      if (cg * 4 + j >= Cg) {
        xr[j] = nullptr;
        continue;
      }
      const float* src = c.X + static_cast<std::size_t>(g * Cg + cg * 4 + j) * plane +
                         static_cast<std::size_t>(oh) * p.stride_h * c.W;
      float* r = rows.data() + static_cast<std::size_t>(j) * c.OW;
      for (int ow = 0; ow < c.OW; ++ow) r[ow] = src[static_cast<std::size_t>(ow) * p.stride_w];
      xr[j] = r;
    }
    w.ops->quant_pack4(xr, c.OW, c.scale, c.zpf, dst + static_cast<std::size_t>(oh) * c.OW * 4);
  }
  std::memset(dst + used, z, static_cast<std::size_t>(k.L) * 4 - used);
}

// Space-to-depth packing of input channel c: quantize (or copy) it into a zero-point padded plane of
// 2 Hs x 2 Ws, then pixel (i, j) of the phase images is the 2x2 block at (2i, 2j): bytes
// [x(2i, 2j), x(2i, 2j+1), x(2i+1, 2j), x(2i+1, 2j+1)].
void s2d_pack_task(void* data, std::size_t i) {
  const PackCtx& k = *static_cast<const PackCtx*>(data);
  const ConvCtx& c = *k.c;
  const PackedConvImpl& w = *c.w;
  const int C = w.p.C;
  i = static_cast<std::size_t>(w.CGp) - 1 - i;
  std::uint8_t* dst = k.Xq + static_cast<std::ptrdiff_t>(i) * k.L * 4;
  const std::uint8_t z = static_cast<std::uint8_t>(c.zpf);
  std::memset(dst, z, static_cast<std::size_t>(k.L) * 4);
  if (static_cast<int>(i) >= C) return;  // channel-group padding (zero weights)
  // pad_quant_plane fills a (Hp x Wp) plane; Hp = 2 Hs and Wp = 2 Ws here (the extra row/column
  // past the conv's own padding is zero point too).
  auto plane = aligned_alloc_n<std::uint8_t>(static_cast<std::size_t>(c.Hp) * c.Wp);
  std::memset(plane.get(), z, static_cast<std::size_t>(c.Hp) * c.Wp);
  pad_quant_plane(c, i, plane.get());
  const int Hs = c.Hp / 2, Ws = c.Wp / 2;
  for (int r = 0; r < Hs; ++r) {
    const std::uint8_t* r0 = plane.get() + static_cast<std::size_t>(2 * r) * c.Wp;
    const std::uint8_t* r1 = r0 + c.Wp;
    std::uint8_t* o = dst + static_cast<std::size_t>(r) * Ws * 4;
    for (int j = 0; j < Ws; ++j) {
      o[4 * j] = r0[2 * j];
      o[4 * j + 1] = r0[2 * j + 1];
      o[4 * j + 2] = r1[2 * j];
      o[4 * j + 3] = r1[2 * j + 1];
    }
  }
}

struct DirectJob {
  DirectConv d;
  const IsaOps* ops;
  int nqt, ntq, nto, mtiles;  // q tiles, task splits over q and oc, oc tiles
  int nq;                     // pixels computed (the last q tile may be narrower)
};

void direct_task(void* data, std::size_t i) {
  const DirectJob& j = *static_cast<const DirectJob*>(data);
  const IsaOps& o = *j.ops;
  const int qi = static_cast<int>(i) / j.nto, oi = static_cast<int>(i) % j.nto;
  const int q0 = static_cast<int>(static_cast<long long>(j.nqt) * qi / j.ntq) * o.conv_qt;
  const int q1 = std::min(j.nq, static_cast<int>(static_cast<long long>(j.nqt) * (qi + 1) / j.ntq) * o.conv_qt);
  const int m0 = static_cast<int>(static_cast<long long>(j.mtiles) * oi / j.nto) * o.conv_mt;
  const int m1 = static_cast<int>(static_cast<long long>(j.mtiles) * (oi + 1) / j.nto) * o.conv_mt;
  if (q0 >= q1 || m0 >= m1) return;
  if (o.task_begin) o.task_begin();
  o.conv_direct(j.d, m0, m1, q0, q1);
  if (o.task_end) o.task_end();
}

// Whether a pass over n input elements (min/max scan, quantize-and-pack) is worth its own parallel
// region: with a spinning pool from 64K elements; without spinning each region pays a thread
// wake-up, so from 1M (measured on ResNet-50's last 1x1 conv, 2048 x 7 x 7, through onnxruntime's
// pool without spinning: 2 threads ran slower than 1 with every step parallel).
bool worth_a_region(const Parallel& par, std::size_t n) {
  return par.run && par.degree > 1 && n >= (par.cheap_wake ? std::size_t{1} << 16 : std::size_t{1} << 20);
}

// Per-image min/max, split into chunks when threads are available (min/max is exact in any order).
struct MinMaxCtx {
  const IsaOps* ops;
  const float* x;
  std::size_t n, chunk;
  float* lo;
  float* hi;
};

void minmax_task(void* data, std::size_t i) {
  const MinMaxCtx& m = *static_cast<const MinMaxCtx*>(data);
  const std::size_t b = i * m.chunk, e = std::min(m.n, b + m.chunk);
  float lo = 0.f, hi = 0.f;
  if (b < e) m.ops->minmax(m.x + b, e - b, &lo, &hi);
  m.lo[i] = lo;
  m.hi[i] = hi;
}

void image_minmax(const IsaOps& o, const float* x, std::size_t n, const Parallel& par, float* lo, float* hi) {
  if (!worth_a_region(par, n)) {
    o.minmax(x, n, lo, hi);
    return;
  }
  const std::size_t chunks = static_cast<std::size_t>(2 * par.degree);
  std::vector<float> l(chunks), h(chunks);
  MinMaxCtx m{&o, x, n, (n + chunks - 1) / chunks, l.data(), h.data()};
  par(minmax_task, chunks, &m);
  float L = *lo, H = *hi;
  for (std::size_t i = 0; i < chunks; ++i) {
    L = l[i] < L ? l[i] : L;
    H = h[i] > H ? h[i] : H;
  }
  *lo = L;
  *hi = H;
}

}  // namespace
}  // namespace detail

using namespace detail;

std::shared_ptr<const PackedConv> pack_conv_weights(const std::int8_t* W, const ConvParams& p, Isa isa) {
  if (p.C <= 0 || p.M <= 0 || p.group <= 0 || p.C % p.group || p.M % p.group || p.kH <= 0 || p.kW <= 0 ||
      p.stride_h <= 0 || p.stride_w <= 0 || p.dil_h <= 0 || p.dil_w <= 0 || p.pad_top < 0 || p.pad_left < 0 ||
      p.pad_bottom < 0 || p.pad_right < 0)
    throw std::invalid_argument("onnxopt: pack_conv_weights: invalid conv parameters");
  auto w = std::make_shared<PackedConvImpl>();
  w->p = p;
  w->dkH = p.kH;
  w->dkW = p.kW;
  const int Cg = p.C / p.group, Mg = p.M / p.group, Kg = Cg * p.kH * p.kW;
  // Stride 2 with few input channels: space-to-depth onto the direct kernel instead of im2col.
  const bool s2d_shape = p.stride_h == 2 && p.stride_w == 2 && p.dil_h == 1 && p.dil_w == 1 && p.group == 1 &&
                         Cg <= 16 && Cg > 1 && !(p.kH == 1 && p.kW == 1);
  // AMX's direct kernel works on 64-channel blocks: with <= 16 input channels per group at least
  // three quarters of each tile multiply is zero padding and the AVX512-VNNI kernel is faster
  // (8 -> 16 3x3 at 112: 141 us against 243 us on AMX; 16 -> 96 1x1 at 112: 502 against 553 us).
  // From 24 channels on AMX wins or ties despite the padding (32 -> 32 3x3 at 56: 105 against
  // 144 us; 48 -> 48 3x3 at 28: 54 against 88 us). Exception: strided stems, where AMX im2col
  // beats space-to-depth on AVX512-VNNI for kernels larger than 3x3 (ResNet-50's 7x7) and, from
  // the pixel-interleaved image (<= 4 channels), for 3x3 too (MobileNet's 3 -> 32 s2 at 224, u8
  // out: 314 -> 290 us).
  if (isa == Isa::Amx && Cg <= 16 && !(s2d_shape && (p.kH * p.kW > 9 || (Cg <= 4 && p.kW <= 7))))
    isa = Isa::Avx512Vnni;
  w->ops = &ops_for(isa);
  w->depthwise = Cg == 1;
  if (w->depthwise) {
    w->dw_w.assign(W, W + static_cast<std::size_t>(p.M) * Kg);
    w->dw_sum.assign(p.M, 0);
    for (int oc = 0; oc < p.M; ++oc)
      for (int k = 0; k < Kg; ++k) w->dw_sum[oc] += W[static_cast<std::size_t>(oc) * Kg + k];
  } else if (w->ops->conv_direct &&
             ((p.stride_h == 1 && p.stride_w == 1) ||
              (p.kH == 1 && p.kW == 1 && p.pad_top == 0 && p.pad_left == 0 && p.pad_bottom == 0 && p.pad_right == 0) ||
              (s2d_shape && isa != Isa::Amx))) {
    const IsaOps& o = *w->ops;
    w->direct = true;
    w->s2d = p.stride_h == 2 && !(p.kH == 1 && p.kW == 1);
    w->dkH = w->s2d ? (p.kH + 1) / 2 : p.kH;
    w->dkW = w->s2d ? (p.kW + 1) / 2 : p.kW;
    const int taps = w->dkH * w->dkW;
    std::vector<std::int8_t> expanded;  // s2d: [M][4 Cg][dkH][dkW], zero where 2k + parity >= kernel
    int Ce = Cg;
    if (w->s2d) {
      Ce = 4 * Cg;
      expanded.assign(static_cast<std::size_t>(p.M) * Ce * taps, 0);
      for (int oc = 0; oc < p.M; ++oc)
        for (int c = 0; c < Cg; ++c)
          for (int kh = 0; kh < p.kH; ++kh)
            for (int kw = 0; kw < p.kW; ++kw) {
              const int ce = c * 4 + (kh % 2) * 2 + kw % 2, t = (kh / 2) * w->dkW + kw / 2;
              expanded[(static_cast<std::size_t>(oc) * Ce + ce) * taps + t] =
                  W[((static_cast<std::size_t>(oc) * Cg + c) * p.kH + kh) * p.kW + kw];
            }
      W = expanded.data();
    }
    const int Ke = Ce * taps;
    w->CGp = round_up((Ce + 3) / 4, o.conv_cg_align);
    w->Kd = taps * w->CGp * 4;
    w->Mp = round_up(Mg, o.conv_mt);
    const std::size_t per_group = static_cast<std::size_t>(w->Mp) * w->Kd;
    w->d_w = aligned_alloc_n<std::int8_t>(per_group * p.group);
    std::memset(w->d_w.get(), 0, per_group * p.group + 64);
    w->dw_sum.assign(p.M, 0);
    for (int g = 0; g < p.group; ++g)
      for (int oc = 0; oc < Mg; ++oc) {
        const std::int8_t* src = W + static_cast<std::size_t>(g * Mg + oc) * Ke;
        std::int8_t* dst = w->d_w.get() + g * per_group + static_cast<std::size_t>(oc) * w->Kd;
        std::int32_t sum = 0;
        for (int c = 0; c < Ce; ++c)
          for (int t = 0; t < taps; ++t) {
            const std::int8_t v = src[c * taps + t];
            dst[(t * w->CGp + c / 4) * 4 + c % 4] = v;
            sum += v;
          }
        w->dw_sum[g * Mg + oc] = sum;
      }
  } else if (p.group == 1 && Cg <= 4 && p.kW <= 7 && p.dil_w == 1 && p.kH * p.kW > 1) {
    w->il = true;
    const int Ki = p.kH * p.kW * 4;
    std::vector<std::int8_t> wi(static_cast<std::size_t>(p.M) * Ki, 0);  // [M][kH][kW][4]
    for (int oc = 0; oc < p.M; ++oc)
      for (int c = 0; c < Cg; ++c)
        for (int kh = 0; kh < p.kH; ++kh)
          for (int kw = 0; kw < p.kW; ++kw)
            wi[static_cast<std::size_t>(oc) * Ki + (kh * p.kW + kw) * 4 + c] =
                W[((static_cast<std::size_t>(oc) * Cg + c) * p.kH + kh) * p.kW + kw];
    w->groups.push_back(pack_b(wi.data(), Ki, p.M, 1, Ki, isa, nullptr));
  } else {
    for (int g = 0; g < p.group; ++g)
      w->groups.push_back(pack_b(W + static_cast<std::size_t>(g) * Mg * Kg, Kg, Mg, 1, Kg, isa, nullptr));
  }
  return w;
}

Isa packed_conv_isa(const PackedConv& pw) {
  const auto* w = dynamic_cast<const PackedConvImpl*>(&pw);
  if (!w) throw std::invalid_argument("onnxopt: weights were not packed by pack_conv_weights");
  return w->ops->isa;
}

namespace detail {
namespace {

// The input image as the GEMM paths read it: the pixel-interleaved image (im2col il), or the
// zero-point padded planes (im2col), nothing for the 1x1 GEMM path (its fill quantizes).
struct ImagePrep {
  const ConvCtx* c;
  std::uint8_t* xp;
  std::uint8_t* xplanes;
  int H, W, Hp, Wp;
  bool direct;     // the 1x1 stride-1 GEMM path
  Parallel pad_par;  // for the padded planes (serial when not worth a region)
};

void prepare_image(void* data) {
  const ImagePrep& k = *static_cast<const ImagePrep*>(data);
  const ConvCtx& c = *k.c;
  const PackedConvImpl* w = c.w;
  const ConvParams& p = w->p;
  const int H = k.H, W = k.W, Hp = k.Hp, Wp = k.Wp;
  const bool direct = k.direct;
  if (w->il && (c.Xu || w->ops->quant_pack4)) {
    // quantized (or u8) channel rows interleaved straight into the padded pixel image, one pass
    const std::uint8_t z = static_cast<std::uint8_t>(c.zpf);
    const std::size_t plane = static_cast<std::size_t>(H) * W;
    std::memset(k.xp, z, static_cast<std::size_t>(p.pad_top) * Wp * 4);
    for (int h = 0; h < H; ++h) {
      std::uint8_t* row = k.xp + static_cast<std::size_t>(p.pad_top + h) * Wp * 4;
      std::memset(row, z, static_cast<std::size_t>(p.pad_left) * 4);
      if (c.Xu) {
        const std::uint8_t* xr[4];
        for (int j = 0; j < 4; ++j) xr[j] = j < p.C ? c.Xu + j * plane + static_cast<std::size_t>(h) * W : nullptr;
        interleave4_u8(xr, W, z, row + static_cast<std::size_t>(p.pad_left) * 4);
      } else {
        const float* xr[4];
        for (int j = 0; j < 4; ++j) xr[j] = j < p.C ? c.X + j * plane + static_cast<std::size_t>(h) * W : nullptr;
        w->ops->quant_pack4(xr, W, c.scale, c.zpf, row + static_cast<std::size_t>(p.pad_left) * 4);
      }
      std::memset(row + static_cast<std::size_t>(p.pad_left + W) * 4, z, static_cast<std::size_t>(Wp - p.pad_left - W) * 4);
    }
    const std::size_t used = static_cast<std::size_t>(p.pad_top + H) * Wp * 4;
    std::memset(k.xp + used, z, static_cast<std::size_t>(Hp) * Wp * 4 - used);
  } else if (w->il) {  // ISAs without quant_pack4: padded planes, then interleaved
    for (int ci = 0; ci < p.C; ++ci) pad_quant_plane(c, ci, k.xplanes + static_cast<std::size_t>(ci) * Hp * Wp);
    const std::vector<std::uint8_t> zrow(static_cast<std::size_t>(Wp), static_cast<std::uint8_t>(c.zpf));
    const std::uint8_t* rows[4];
    for (int y = 0; y < Hp; ++y) {
      for (int j = 0; j < 4; ++j)
        rows[j] = j < p.C ? k.xplanes + (static_cast<std::size_t>(j) * Hp + y) * Wp : zrow.data();
      interleave4_u8(rows, Wp, 0, k.xp + static_cast<std::size_t>(y) * Wp * 4);
    }
  } else if (!direct) {
    k.pad_par(pad_quant_task, static_cast<std::size_t>(p.C), const_cast<ConvCtx*>(&c));
  }
}

// Whether the direct kernel (stride 1, or 1x1 on the subsampled image) suits this image: it
// computes the pixels over the padded width in 16-pixel steps, so on small images much of its work
// is padding (ResNet-50's 7x7 3x3 layer: 49 outputs in 64 computed pixels; at 96, before the
// narrow tail tiles, 0.53-0.68x of onnxruntime's QLinearConv) while the im2col GEMM's 6-row tiles
// waste under 10% (0.9-1.1x). Space-to-depth stays direct.
int qmin(const IsaOps& o) { return o.conv_qmin ? o.conv_qmin : o.conv_qt; }

bool direct_pays(const PackedConvImpl& w, int OH, int OW) {
  if (!w.direct || w.s2d || w.ops->isa != Isa::Avx512Vnni) return w.direct;
  const ConvParams& p = w.p;
  const bool subsample = p.stride_h != 1 || p.stride_w != 1;
  const int DW = subsample ? OW : OW + (p.kW - 1) * p.dil_w;  // the padded width of a stride-1 conv
  const long useful = static_cast<long>(OH) * OW, computed = round_up(OH * DW, qmin(*w.ops));
  return useful * 100 >= computed * 85;
}

// Float (X) or u8 (Xu, quantized with *x_scale / *x_zp) input; float (Y) or u8 (Yu, stage.requant)
// output. With a residual the inner kernels of the non-direct paths run without the activation;
// the residual and the activation are applied per channel plane right after (residual_act), and a
// u8 output of those paths is requantized from a float plane then.
void conv_impl(const float* X, const std::uint8_t* Xu, int N, int H, int W, const float* x_scale,
               const std::uint8_t* x_zp, const PackedConvImpl* w, const OutputStage& stage, float* Y,
               std::uint8_t* Yu, const Parallel& par_in) {
  const ConvParams& p = w->p;
  // Without a spinning pool (onnxruntime, allow_spinning=0) each parallel region costs a thread
  // wake-up of tens of microseconds: 2048 -> 512 1x1 at 7x7 (51M MACs, ~100 us) ran 1.4x slower
  // on 2 threads than on 1. Such calls run on the calling thread.
  const long long conv_macs = static_cast<long long>(N) * p.M * (p.C / p.group) * p.kH * p.kW *
                              conv_out_dim(H, p.kH, p.stride_h, p.dil_h, p.pad_top, p.pad_bottom) *
                              conv_out_dim(W, p.kW, p.stride_w, p.dil_w, p.pad_left, p.pad_right);
  // (ResNet-50's 7x7 stem, 118M MACs at ~750 us, still gains: 2 threads take 450 us.)
  // Exception (hide): static quantization, one group, an image small enough to prepare on one
  // thread: the preparation and the compute tasks run in one region (run_after), the calling
  // thread starts at once and the workers' wake-up overlaps the preparation. Then only convs below
  // 8M MACs stay on the calling thread.
  const std::size_t img_elems = static_cast<std::size_t>(p.C) * H * W;
  const bool hide = !par_in.cheap_wake && par_in.run && par_in.degree > 1 && p.group == 1 && x_scale != nullptr &&
                    p.C > 1 && img_elems < (std::size_t{1} << 20);  // (C = 1: the depthwise path)
  const Parallel par = (!par_in.cheap_wake && conv_macs < (hide ? (1LL << 23) : (1LL << 26))) ? Parallel{} : par_in;
  const int OH = conv_out_dim(H, p.kH, p.stride_h, p.dil_h, p.pad_top, p.pad_bottom);
  const int OW = conv_out_dim(W, p.kW, p.stride_w, p.dil_w, p.pad_left, p.pad_right);
  if (N < 0 || H <= 0 || W <= 0 || OH <= 0 || OW <= 0)
    throw std::invalid_argument("onnxopt: qconv2d: input too small for the kernel");
  const std::vector<float> ws = expand_scale(stage, p.M);
  const int Mg = p.M / p.group;
  const bool use_direct = direct_pays(*w, OH, OW);
  const auto& gemm_groups = w->direct ? (use_direct ? w->groups : w->small_image_groups()) : w->groups;
  const bool direct = !use_direct && p.kH == 1 && p.kW == 1 && p.stride_h == 1 && p.stride_w == 1 &&
                      p.pad_top == 0 && p.pad_left == 0 && p.pad_bottom == 0 && p.pad_right == 0 && !w->depthwise;
  // 1x1 strided direct path: a stride-1 conv over the OH x OW subsampled image.
  const bool subsample = use_direct && !w->s2d && (p.stride_h != 1 || p.stride_w != 1);
  // Hp x Wp: the plane an input channel is padded and quantized into; DH x DW: the direct kernel's
  // image (output pixel q = oh * DW + ow), the phase images for s2d.
  int Hp = H + p.pad_top + p.pad_bottom, Wp = W + p.pad_left + p.pad_right;
  if (subsample) Hp = OH, Wp = OW;
  int DH = Hp, DW = Wp;
  if (w->s2d) {
    DH = (Hp + 1) / 2, DW = (Wp + 1) / 2;
    Hp = 2 * DH, Wp = 2 * DW;
  }
  const int ddil_h = w->s2d ? 1 : p.dil_h, ddil_w = w->s2d ? 1 : p.dil_w;
  const std::size_t in_img = static_cast<std::size_t>(p.C) * H * W;
  const std::size_t out_plane = static_cast<std::size_t>(OH) * OW;
  AlignedBuf<std::uint8_t> xp;
  // Direct path geometry: pixels q in [0, Nqp) over the padded width, each tap at a fixed offset.
  std::vector<int> tap_off;
  std::ptrdiff_t L = 0;
  int Nqp = 0;
  if (use_direct) {
    const IsaOps& o = *w->ops;
    for (int kh = 0; kh < w->dkH; ++kh)
      for (int kw = 0; kw < w->dkW; ++kw) tap_off.push_back(kh * ddil_h * DW + kw * ddil_w);
    Nqp = round_up(OH * DW, qmin(o));
    L = round_up(std::max(DH * DW, Nqp + tap_off.back()), 16);
    xp = aligned_alloc_n<std::uint8_t>(static_cast<std::size_t>(p.group) * w->CGp * L * 4);
  } else if (!direct && !w->depthwise) {
    xp = aligned_alloc_n<std::uint8_t>(static_cast<std::size_t>(w->il ? 4 : p.C) * Hp * Wp);
  }
  AlignedBuf<std::uint8_t> xplanes;  // interleaved im2col without quant_pack4: the padded planes
  if (w->il && !Xu && !w->ops->quant_pack4) xplanes = aligned_alloc_n<std::uint8_t>(static_cast<std::size_t>(p.C) * Hp * Wp);
  // u8 output of the GEMM paths: float staging image, requantized per plane in finish_task
  // (the GEMM epilogue requantizes straight into Yu when there is no residual to add first)
  const bool stage_gemm = Yu && !use_direct && !w->depthwise && stage.residual;
  AlignedBuf<float> ystage;
  if (stage_gemm) ystage = aligned_alloc_n<float>(static_cast<std::size_t>(p.M) * out_plane);

  for (int n = 0; n < N; ++n) {
    ConvCtx c{};
    c.w = w;
    c.X = X ? X + n * in_img : nullptr;
    c.Xu = Xu ? Xu + n * in_img : nullptr;
    c.Yu = Yu ? Yu + n * static_cast<std::size_t>(p.M) * out_plane : nullptr;
    c.out_scale = stage.out_scale;
    c.out_zp = static_cast<float>(stage.out_zp);
    c.Xp = xp.get();
    c.H = H, c.W = W, c.Hp = Hp, c.Wp = Wp, c.OH = OH, c.OW = OW;
    if (x_scale) {
      c.scale = *x_scale;
      c.zpf = static_cast<float>(x_zp ? *x_zp : 0);
    } else {
      float lo = 0.f, hi = 0.f;
      image_minmax(*w->ops, c.X, in_img, par, &lo, &hi);
      dynamic_params(lo, hi, &c.scale, &c.zpf);
    }
    c.Y = Yu ? ystage.get() : Y + n * static_cast<std::size_t>(p.M) * out_plane;  // null: u8 straight out
    c.ep.wscale = ws.data();
    c.ep.bias = stage.bias;
    c.ep.act = stage.residual ? Activation::None : stage.act;
    c.ep.lo = stage.clip_lo;
    c.ep.hi = stage.clip_hi;
    c.R = stage.residual ? stage.residual + n * static_cast<std::size_t>(p.M) * out_plane : nullptr;
    c.act = stage.act;
    c.lo = stage.clip_lo;
    c.hi = stage.clip_hi;
    if (use_direct) {
      PackCtx pk{&c, xp.get(), L};
      PackAll pack{w->s2d ? s2d_pack_task : subsample ? direct_pack_strided_task : direct_pack_task,
                   static_cast<std::size_t>(p.group) * w->CGp, &pk};
      const bool one_region = hide && par.run;
      if (!one_region) (worth_a_region(par, in_img) ? par : Parallel{})(pack.fn, pack.n, &pk);
      const IsaOps& o = *w->ops;
      const int degree = (par.run && par.degree > 1) ? par.degree : 1;
      for (int g = 0; g < p.group; ++g) {
        DirectJob j{};
        DirectConv& d = j.d;
        d.X = xp.get() + static_cast<std::ptrdiff_t>(g) * w->CGp * L * 4;
        d.L = L;
        d.W = w->d_w.get() + static_cast<std::size_t>(g) * w->Mp * w->Kd;
        d.Kd = w->Kd;
        d.CGp = w->CGp;
        d.taps = w->dkH * w->dkW;
        d.tap_off = tap_off.data();
        d.Wp = DW, d.OH = OH, d.OW = OW;
        d.Mg = Mg;
        d.wsum = w->dw_sum.data() + static_cast<std::size_t>(g) * Mg;
        d.zp = static_cast<std::int32_t>(c.zpf);
        d.a_scale = c.scale;
        d.wscale = ws.data() + static_cast<std::size_t>(g) * Mg;
        d.bias = stage.bias ? stage.bias + static_cast<std::size_t>(g) * Mg : nullptr;
        d.act = stage.act;
        d.lo = stage.clip_lo;
        d.hi = stage.clip_hi;
        d.Y = Yu ? nullptr : c.Y + static_cast<std::size_t>(g) * Mg * out_plane;
        d.Yu = c.Yu ? c.Yu + static_cast<std::size_t>(g) * Mg * out_plane : nullptr;
        d.out_scale = c.out_scale;
        d.out_zp = c.out_zp;
        d.R = c.R ? c.R + static_cast<std::size_t>(g) * Mg * out_plane : nullptr;
        d.oplane = static_cast<std::ptrdiff_t>(out_plane);
        j.ops = &o;
        j.nqt = (Nqp + o.conv_qt - 1) / o.conv_qt;
        j.nq = Nqp;
        j.mtiles = w->Mp / o.conv_mt;
        j.ntq = 1;
        j.nto = 1;
        if (degree > 1) {
          // Pick the split (pixel chunks x channel chunks, about 4 tasks per thread) with the
          // shortest estimated makespan: rounds of `degree` tasks times the largest task.
          // Every pixel chunk reads all of its channel chunk's weights and every channel chunk all
          // of its pixels' packed input: split only along the larger operand when that still gives
          // each thread work (2048 -> 512 at 7x7: 1 MB of weights, 128 KB of input; splitting the
          // two pixel tiles read the weights twice and ran slower on 2 threads than on 1).
          const long w_bytes = static_cast<long>(w->Mp) * w->Kd, x_bytes = static_cast<long>(w->CGp) * L * 4;
          const bool oc_only = w_bytes > x_bytes && j.mtiles >= degree;
          const bool px_only = !oc_only && x_bytes > w_bytes && j.nqt >= degree;
          long best = -1;
          const int target = 4 * degree;
          for (int nto = 1; nto <= (px_only ? 1 : std::min(j.mtiles, target)); ++nto) {
            const int ntq = oc_only ? 1 : std::min(j.nqt, std::max(1, target / nto));
            const long tasks = static_cast<long>(ntq) * nto;
            const long biggest = static_cast<long>((j.nqt + ntq - 1) / ntq) * ((j.mtiles + nto - 1) / nto);
            const long span = (tasks + degree - 1) / degree * biggest;
            if (best < 0 || span < best) {
              best = span;
              j.ntq = ntq;
              j.nto = nto;
            }
          }
        }
        if (one_region)  // (one group)
          run_after(par, pack_all, &pack, direct_task, static_cast<std::size_t>(j.ntq) * j.nto, &j);
        else
          par(direct_task, static_cast<std::size_t>(j.ntq) * j.nto, &j);
      }
      continue;
    }
    if (w->depthwise) {
      // about 4 tasks per thread (load balance), all channels in one task when serial
      const int degree = (par.run && par.degree > 1) ? par.degree : 1;
      DwJob job{&c, degree == 1 ? p.C : std::max(1, p.C / (4 * degree))};
      par(depthwise_task, static_cast<std::size_t>((p.C + job.per_task - 1) / job.per_task), &job);
      continue;
    }
    const bool one_region = hide && p.group == 1 && !c.R;
    // (inside run_after the preparation is one slot's serial work: no nested region)
    ImagePrep prep{&c, xp.get(), xplanes.get(), H, W, Hp, Wp, direct,
                   !one_region && worth_a_region(par, in_img) ? par : Parallel{}};
    if (!one_region) prepare_image(&prep);
    for (int g = 0; g < p.group; ++g) {
      ConvCtx cg = c;
      cg.g = g;
      cg.ep.wscale = ws.data() + static_cast<std::size_t>(g) * Mg;
      cg.ep.bias = stage.bias ? stage.bias + static_cast<std::size_t>(g) * Mg : nullptr;
      if (Yu && !stage_gemm) {
        cg.ep.requant = true;
        cg.ep.cu = c.Yu + static_cast<std::size_t>(g) * Mg * out_plane;
        cg.ep.out_scale = c.out_scale;
        cg.ep.out_zp = c.out_zp;
      } else {
        cg.ep.cf = c.Y + static_cast<std::size_t>(g) * Mg * out_plane;
      }
      cg.ep.ldm = 1;
      cg.ep.ldn = static_cast<std::ptrdiff_t>(out_plane);
      const ASource src{direct ? fill_1x1 : fill_im2col, &cg};
      if (one_region) {  // (one group) the image prepared in the region of the GEMM tasks
        GemmJob job = plan_gemm(*gemm_groups[g], static_cast<int>(out_plane), src, cg.ep, par, true);
        const std::size_t n = static_cast<std::size_t>(job.mchunks) * job.nchunks;
        if (job.parallel) {
          run_after(par, prepare_image, &prep, gemm_task, n, &job);
        } else {
          prepare_image(&prep);
          for (std::size_t i = 0; i < n; ++i) gemm_task(&job, i);
        }
        continue;
      }
      run_gemm(*gemm_groups[g], static_cast<int>(out_plane), src, cg.ep, par);
    }
    if (c.R) par(finish_task, static_cast<std::size_t>(p.M), &c);  // requantizes too when staged
  }
}

const PackedConvImpl* conv_impl_of(const PackedConv& pw, const char* fn) {
  const auto* w = dynamic_cast<const PackedConvImpl*>(&pw);
  if (!w) throw std::invalid_argument(std::string("onnxopt: ") + fn + ": weights were not packed by pack_conv_weights");
  return w;
}

}  // namespace
}  // namespace detail

void qconv2d_f32(const float* X, int N, int H, int W, const float* x_scale, const std::uint8_t* x_zp,
                 const PackedConv& pw, const OutputStage& stage, float* Y, const Parallel& par) {
  const PackedConvImpl* w = conv_impl_of(pw, "qconv2d_f32");
  if (stage.requant) throw std::invalid_argument("onnxopt: qconv2d_f32 produces float output (requant unsupported)");
  conv_impl(X, nullptr, N, H, W, x_scale, x_zp, w, stage, Y, nullptr, par);
}

void qconv2d_u8(const std::uint8_t* X, int N, int H, int W, float x_scale, std::uint8_t x_zp, const PackedConv& pw,
                const OutputStage& stage, std::uint8_t* Y, const Parallel& par) {
  const PackedConvImpl* w = conv_impl_of(pw, "qconv2d_u8");
  if (!stage.requant) throw std::invalid_argument("onnxopt: qconv2d_u8 produces u8 output (stage.requant must be set)");
  if (!(x_scale > 0.f) || !(stage.out_scale > 0.f))
    throw std::invalid_argument("onnxopt: qconv2d_u8: x_scale and out_scale must be positive");
  conv_impl(nullptr, X, N, H, W, &x_scale, &x_zp, w, stage, nullptr, Y, par);
}

}  // namespace onnxopt
