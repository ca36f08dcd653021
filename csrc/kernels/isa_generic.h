// Element-wise arithmetic of the numerics contract, written once and compiled into every ISA
// translation unit (each includes this inside its own namespace, so nothing here is shared across
// TUs built with different flags). The vector paths must produce the same bits; the comments in
// onnxopt_kernels.h are the specification. Comparisons are spelled as ternaries on purpose:
// `y > lo ? y : lo` is exactly what vmaxps(y, lo) computes, including for NaN and signed zeros.
//
// The including TU must include <cmath> and internal.h before opening its namespace.

// Zero-point correction in wrapping 32-bit arithmetic (the vector paths wrap as well).
static inline std::int32_t zp_correct(std::int32_t acc, std::int32_t rzp, std::int32_t rsum,
                                      std::int32_t csum, std::int32_t wzp, int K) {
  std::uint32_t v = static_cast<std::uint32_t>(acc) -
                    static_cast<std::uint32_t>(rzp) * static_cast<std::uint32_t>(csum) -
                    static_cast<std::uint32_t>(wzp) * static_cast<std::uint32_t>(rsum) +
                    static_cast<std::uint32_t>(K) * static_cast<std::uint32_t>(rzp) *
                        static_cast<std::uint32_t>(wzp);
  return static_cast<std::int32_t>(v);
}

static inline float activate(float y, onnxopt::Activation act, float lo, float hi) {
  if (act == onnxopt::Activation::Relu) {
    y = y > 0.f ? y : 0.f;
  } else if (act == onnxopt::Activation::Clip) {
    y = y > lo ? y : lo;
    y = y < hi ? y : hi;
  }
  return y;
}

static inline std::uint8_t requantize(float y, float out_scale, float out_zp) {
  float t = std::nearbyint(y / out_scale) + out_zp;
  t = t > 0.f ? t : 0.f;
  t = t < 255.f ? t : 255.f;
  return static_cast<std::uint8_t>(static_cast<int>(t));
}

// Requantize n floats, the contract's rounding (the portable `requant` of IsaOps).
static void requant_generic(const float* y, std::size_t n, float scale, float zpf, std::uint8_t* q) {
  for (std::size_t i = 0; i < n; ++i) q[i] = requantize(y[i], scale, zpf);
}

static inline void store_element(float y, std::ptrdiff_t off, const onnxopt::detail::Epilogue& ep) {
  if (ep.requant)
    ep.cu[off] = requantize(y, ep.out_scale, ep.out_zp);
  else
    ep.cf[off] = y;
}

// Output stage over an int32 tile acc[mr][ldacc] (columns relative to t.n).
static inline void epilogue_generic(const std::int32_t* acc, int ldacc, const onnxopt::detail::Tile& t,
                                    const onnxopt::detail::Epilogue& ep) {
  for (int r = 0; r < t.mr; ++r) {
    const std::int32_t rzp = t.rzp[r];
    const std::int32_t rsum = t.rsum ? t.rsum[r] : 0;
    const float rs = t.rscale[r];
    for (int j = 0; j < t.ncols; ++j) {
      const int n = t.n + j;
      std::int32_t a = zp_correct(acc[r * ldacc + j], rzp, rsum, ep.colsum[n], ep.wzp ? ep.wzp[n] : 0, ep.K);
      float s = rs * ep.wscale[n];
      float y = static_cast<float>(a) * s;
      if (ep.bias) y = y + ep.bias[n];
      y = activate(y, ep.act, ep.lo, ep.hi);
      store_element(y, static_cast<std::ptrdiff_t>(t.m + r) * ep.ldm + static_cast<std::ptrdiff_t>(n) * ep.ldn, ep);
    }
  }
}

static void minmax_generic(const float* x, std::size_t n, float* lo, float* hi) {
  float l = *lo, h = *hi;
  for (std::size_t i = 0; i < n; ++i) {
    l = x[i] < l ? x[i] : l;
    h = x[i] > h ? x[i] : h;
  }
  *lo = l;
  *hi = h;
}

static void quant_generic(const float* x, std::size_t n, float scale, float zpf, std::uint8_t* q) {
  for (std::size_t i = 0; i < n; ++i) {
    float t = std::nearbyint(x[i] / scale) + zpf;
    t = t > 0.f ? t : 0.f;
    t = t < 255.f ? t : 255.f;
    q[i] = static_cast<std::uint8_t>(static_cast<int>(t));
  }
}

// Direct depthwise convolution of one padded u8 plane. The inner loops are plain so that the
// compiler vectorizes them with the TU's flags (integer math: exact regardless of vector width).
static void depthwise_generic(const std::uint8_t* xp, int Wp, const std::int8_t* w, int kH, int kW,
                              int sh, int sw, int dh, int dw, int OH, int OW, std::int32_t wsum,
                              std::int32_t zp, float a_scale, int oc,
                              const onnxopt::detail::Epilogue& ep, float* out, std::int32_t* acc_) {
  std::int32_t* __restrict acc = acc_;
  const float s = a_scale * ep.wscale[oc];
  const float b = ep.bias ? ep.bias[oc] : 0.f;
  // Accumulate over a width rounded up to 32 so the vectorized loop has no scalar tail; the extra
  // lanes read at most 2*31 bytes past a row (the padded plane has 64 bytes of slack) and are
  // never stored. The caller sizes acc_ for OW + 64 entries.
  const int OWv = sw <= 2 ? (OW + 31) / 32 * 32 : OW;
  for (int oh = 0; oh < OH; ++oh) {
    for (int ow = 0; ow < OWv; ++ow) acc[ow] = 0;
    for (int kh = 0; kh < kH; ++kh) {
      const std::uint8_t* row = xp + static_cast<std::ptrdiff_t>(oh * sh + kh * dh) * Wp;
      for (int kw = 0; kw < kW; ++kw) {
        const std::int32_t wv = w[kh * kW + kw];
        const std::uint8_t* __restrict src = row + kw * dw;
        if (sw == 1) {
          for (int ow = 0; ow < OWv; ++ow) acc[ow] += wv * static_cast<std::int32_t>(src[ow]);
        } else if (sw == 2) {
          for (int ow = 0; ow < OWv; ++ow) acc[ow] += wv * static_cast<std::int32_t>(src[2 * ow]);
        } else {
          for (int ow = 0; ow < OW; ++ow) acc[ow] += wv * static_cast<std::int32_t>(src[ow * sw]);
        }
      }
    }
    // Same arithmetic as zp_correct + the output stage, split into flat loops that vectorize.
    float* __restrict o = out + static_cast<std::ptrdiff_t>(oh) * OW;
    const std::uint32_t corr = static_cast<std::uint32_t>(zp) * static_cast<std::uint32_t>(wsum);
    for (int ow = 0; ow < OW; ++ow)
      o[ow] = static_cast<float>(static_cast<std::int32_t>(static_cast<std::uint32_t>(acc[ow]) - corr)) * s;
    if (ep.bias)
      for (int ow = 0; ow < OW; ++ow) o[ow] = o[ow] + b;
    if (ep.act == onnxopt::Activation::Relu) {
      for (int ow = 0; ow < OW; ++ow) o[ow] = o[ow] > 0.f ? o[ow] : 0.f;
    } else if (ep.act == onnxopt::Activation::Clip) {
      const float lo = ep.lo, hi = ep.hi;
      for (int ow = 0; ow < OW; ++ow) {
        float y = o[ow] > lo ? o[ow] : lo;
        o[ow] = y < hi ? y : hi;
      }
    }
  }
}
