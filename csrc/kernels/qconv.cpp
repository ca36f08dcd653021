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
#include <algorithm>
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
  std::vector<std::int32_t> dw_sum;              // depthwise: [M]
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
};

void fill_1x1(const void* vctx, int m0, int mb, std::uint8_t* buf, int ldb, std::int32_t* zp, float* scale) {
  const ConvCtx& c = *static_cast<const ConvCtx*>(vctx);
  const int Cg = c.w->p.C / c.w->p.group;
  const std::size_t plane = static_cast<std::size_t>(c.H) * c.W;
  std::vector<std::uint8_t> tmp(static_cast<std::size_t>(mb));
  for (int ci = 0; ci < Cg; ++ci) {
    const float* x = c.X + static_cast<std::size_t>(c.g * Cg + ci) * plane + m0;
    c.w->ops->quant(x, mb, c.scale, c.zpf, tmp.data());
    for (int r = 0; r < mb; ++r) buf[static_cast<std::size_t>(r) * ldb + ci] = tmp[r];
  }
  for (int r = 0; r < mb; ++r) {
    zp[r] = static_cast<std::int32_t>(c.zpf);
    scale[r] = c.scale;
  }
}

// im2col rows for kernels of width KW with unit width-dilation: constant-size copies.
template <int KW>
void im2col_rows(const ConvCtx& c, int m0, int mb, std::uint8_t* buf, int ldb) {
  const ConvParams& p = c.w->p;
  const int Cg = p.C / p.group;
  const std::size_t plane = static_cast<std::size_t>(c.Hp) * c.Wp;
  for (int r = 0; r < mb; ++r) {
    const int pix = m0 + r, oh = pix / c.OW, ow = pix % c.OW;
    std::uint8_t* dst = buf + static_cast<std::size_t>(r) * ldb;
    const std::uint8_t* base = c.Xp + static_cast<std::size_t>(c.g * Cg) * plane +
                               static_cast<std::size_t>(oh * p.stride_h) * c.Wp + ow * p.stride_w;
    for (int ci = 0; ci < Cg; ++ci, base += plane) {
      for (int kh = 0; kh < p.kH; ++kh, dst += KW)
        std::memcpy(dst, base + static_cast<std::size_t>(kh * p.dil_h) * c.Wp, KW);
    }
  }
}

void fill_im2col(const void* vctx, int m0, int mb, std::uint8_t* buf, int ldb, std::int32_t* zp, float* scale) {
  const ConvCtx& c = *static_cast<const ConvCtx*>(vctx);
  const ConvParams& p = c.w->p;
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

// Quantize channel ci of the image into its zero-point padded plane.
void pad_quant_task(void* data, std::size_t ci) {
  const ConvCtx& c = *static_cast<const ConvCtx*>(data);
  const ConvParams& p = c.w->p;
  std::uint8_t* dst = const_cast<std::uint8_t*>(c.Xp) + ci * static_cast<std::size_t>(c.Hp) * c.Wp;
  const std::uint8_t z = static_cast<std::uint8_t>(c.zpf);
  std::memset(dst, z, static_cast<std::size_t>(p.pad_top) * c.Wp);
  std::memset(dst + static_cast<std::size_t>(p.pad_top + c.H) * c.Wp, z, static_cast<std::size_t>(p.pad_bottom) * c.Wp);
  const float* x = c.X + ci * static_cast<std::size_t>(c.H) * c.W;
  for (int h = 0; h < c.H; ++h) {
    std::uint8_t* row = dst + static_cast<std::size_t>(p.pad_top + h) * c.Wp;
    std::memset(row, z, p.pad_left);
    c.w->ops->quant(x + static_cast<std::size_t>(h) * c.W, c.W, c.scale, c.zpf, row + p.pad_left);
    std::memset(row + p.pad_left + c.W, z, p.pad_right);
  }
}

void depthwise_task(void* data, std::size_t ci) {
  const ConvCtx& c = *static_cast<const ConvCtx*>(data);
  const ConvParams& p = c.w->p;
  const int Mg = p.M / p.group;
  const std::uint8_t* xp = c.Xp + ci * static_cast<std::size_t>(c.Hp) * c.Wp;
  std::vector<std::int32_t> scratch(static_cast<std::size_t>(c.OW) + 64);
  const std::size_t oplane = static_cast<std::size_t>(c.OH) * c.OW;
  for (int j = 0; j < Mg; ++j) {
    const int oc = static_cast<int>(ci) * Mg + j;
    c.w->ops->depthwise(xp, c.Wp, c.w->dw_w.data() + static_cast<std::size_t>(oc) * p.kH * p.kW, p.kH, p.kW,
                        p.stride_h, p.stride_w, p.dil_h, p.dil_w, c.OH, c.OW, c.w->dw_sum[oc],
                        static_cast<std::int32_t>(c.zpf), c.scale, oc, c.ep, c.Y + oc * oplane, scratch.data());
  }
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
  w->ops = &ops_for(isa);
  const int Cg = p.C / p.group, Mg = p.M / p.group, Kg = Cg * p.kH * p.kW;
  w->depthwise = Cg == 1;
  if (w->depthwise) {
    w->dw_w.assign(W, W + static_cast<std::size_t>(p.M) * Kg);
    w->dw_sum.assign(p.M, 0);
    for (int oc = 0; oc < p.M; ++oc)
      for (int k = 0; k < Kg; ++k) w->dw_sum[oc] += W[static_cast<std::size_t>(oc) * Kg + k];
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

void qconv2d_f32(const float* X, int N, int H, int W, const float* x_scale, const std::uint8_t* x_zp,
                 const PackedConv& pw, const OutputStage& stage, float* Y, const Parallel& par) {
  const auto* w = dynamic_cast<const PackedConvImpl*>(&pw);
  if (!w) throw std::invalid_argument("onnxopt: qconv2d_f32: weights were not packed by pack_conv_weights");
  if (stage.requant) throw std::invalid_argument("onnxopt: qconv2d_f32 produces float output (requant unsupported)");
  const ConvParams& p = w->p;
  const int OH = conv_out_dim(H, p.kH, p.stride_h, p.dil_h, p.pad_top, p.pad_bottom);
  const int OW = conv_out_dim(W, p.kW, p.stride_w, p.dil_w, p.pad_left, p.pad_right);
  if (N < 0 || H <= 0 || W <= 0 || OH <= 0 || OW <= 0)
    throw std::invalid_argument("onnxopt: qconv2d_f32: input too small for the kernel");
  const std::vector<float> ws = expand_scale(stage, p.M);
  const int Mg = p.M / p.group;
  const bool direct = p.kH == 1 && p.kW == 1 && p.stride_h == 1 && p.stride_w == 1 && p.pad_top == 0 &&
                      p.pad_left == 0 && p.pad_bottom == 0 && p.pad_right == 0 && !w->depthwise;
  const int Hp = H + p.pad_top + p.pad_bottom, Wp = W + p.pad_left + p.pad_right;
  const std::size_t in_img = static_cast<std::size_t>(p.C) * H * W;
  const std::size_t out_plane = static_cast<std::size_t>(OH) * OW;
  AlignedBuf<std::uint8_t> xp;
  if (!direct) xp = aligned_alloc_n<std::uint8_t>(static_cast<std::size_t>(p.C) * Hp * Wp);

  for (int n = 0; n < N; ++n) {
    ConvCtx c{};
    c.w = w;
    c.X = X + n * in_img;
    c.Xp = xp.get();
    c.H = H, c.W = W, c.Hp = Hp, c.Wp = Wp, c.OH = OH, c.OW = OW;
    if (x_scale) {
      c.scale = *x_scale;
      c.zpf = static_cast<float>(x_zp ? *x_zp : 0);
    } else {
      float lo = 0.f, hi = 0.f;
      w->ops->minmax(c.X, in_img, &lo, &hi);
      dynamic_params(lo, hi, &c.scale, &c.zpf);
    }
    c.Y = Y + n * static_cast<std::size_t>(p.M) * out_plane;
    c.ep.wscale = ws.data();
    c.ep.bias = stage.bias;
    c.ep.act = stage.act;
    c.ep.lo = stage.clip_lo;
    c.ep.hi = stage.clip_hi;
    if (!direct) par(pad_quant_task, static_cast<std::size_t>(p.C), &c);
    if (w->depthwise) {
      par(depthwise_task, static_cast<std::size_t>(p.C), &c);
      continue;
    }
    for (int g = 0; g < p.group; ++g) {
      ConvCtx cg = c;
      cg.g = g;
      cg.ep.wscale = ws.data() + static_cast<std::size_t>(g) * Mg;
      cg.ep.bias = stage.bias ? stage.bias + static_cast<std::size_t>(g) * Mg : nullptr;
      cg.ep.cf = c.Y + static_cast<std::size_t>(g) * Mg * out_plane;
      cg.ep.ldm = 1;
      cg.ep.ldn = static_cast<std::ptrdiff_t>(out_plane);
      run_gemm(*w->groups[g], static_cast<int>(out_plane), ASource{direct ? fill_1x1 : fill_im2col, &cg}, cg.ep, par);
    }
  }
}

}  // namespace onnxopt
