// AVX-512 output stage on 16 columns held in a zmm, shared by the AVX512-VNNI and AMX TUs
// (included inside each TU's own namespace, after isa_generic.h).

static inline __mmask16 col_mask(int valid) {
  return valid >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1u);
}

// nearbyint(x / s) without a division per element where that is provably the same *after the
// caller's clamp into [0, 255] with a zero point in [0, 255]* (quant16_i32 is the only caller):
// r = fl(1/s) and q' = fl(x * r) put q' within 1.5 * 2^-23 |x/s| of x/s, and fl(x/s) is within
// 2^-24 |x/s|, so for |x/s| < 2^11 the two differ by less than 2^-11.4. When q' is at least 2^-10
// away from every half-integer (|q' - nearbyint(q')| < 0.5 - 2^-10), fl(x/s) lies strictly inside
// the same rounding interval and both round to the same integer. Lanes with |x/s| >= 2^11 saturate
// either way (both roundings are beyond +-2047, the clamp gives 255 or 0 whatever the zero point);
// +-Inf and NaN fail the test and take the division. So only lanes near a half-integer (about 1
// in 500) and scales outside [2^-60, 2^60] divide. (Requantized conv outputs saturate often — a
// Relu6 layer's range — and dividing those lanes made uint8 depthwise convs 2-3x slower.)
//
// vlo/vhi: the clamp's bounds, [0, 255] or narrower when an activation is folded in (with_act).
struct QuantScale {
  __m512 vs, vr, vz, vlo, vhi;
  __m512i iz, ilo, ihi;  // the fast path's integer zero point and clamp bounds minus the zero point
  bool fast;
  QuantScale(float scale, float zpf)
      : vs(_mm512_set1_ps(scale)), vr(_mm512_set1_ps(1.f / scale)), vz(_mm512_set1_ps(zpf)),
        vlo(_mm512_setzero_ps()), vhi(_mm512_set1_ps(255.f)), fast(scale >= 0x1p-60f && scale <= 0x1p60f) {
    s_ = scale;
    z_ = zpf;
    // zero points are integers in [0, 255] (callers pass a converted uint8); otherwise exact path only
    if (!(zpf >= 0.f && zpf <= 255.f && zpf == static_cast<float>(static_cast<int>(zpf)))) fast = false;
    set_int_bounds(0.f, 255.f);
  }
  // Whether act(y) followed by this quantization equals the quantization clamped to
  // [q(lo), q(hi)]: exact because q(y) = clamp(nearbyint(y / s) + zp, 0, 255) is non-decreasing in
  // y, so q(min(max(y, lo), hi)) = min(max(q(y), q(lo)), q(hi)); NaN y gives q(lo) both ways
  // (max_ps returns its second operand). A NaN bound keeps the float activation.
  static bool foldable(Activation act, float lo, float hi) {
    return act != Activation::Clip || (lo == lo && hi == hi);
  }
  QuantScale with_act(Activation act, float lo, float hi) const {
    QuantScale q = *this;
    float l = 0.f, h = 255.f;
    if (act == Activation::Relu) {
      l = scalar_q(0.f);
    } else if (act == Activation::Clip) {
      l = scalar_q(lo);
      h = scalar_q(hi);
    }
    q.vlo = _mm512_set1_ps(l);
    q.vhi = _mm512_set1_ps(h);
    q.set_int_bounds(l, h);
    return q;
  }

 private:
  float s_, z_;
  void set_int_bounds(float l, float h) {  // l, h integers in [0, 255]
    const int z = static_cast<int>(z_);
    iz = _mm512_set1_epi32(z);
    ilo = _mm512_set1_epi32(static_cast<int>(l) - z);
    // min(max(n, l - z), h - z) + z = the float clamp of n + z into [l, h]; with l > h (crossed Clip
    // bounds) the float clamp gives h everywhere, and so does this (max then min).
    ihi = _mm512_set1_epi32(static_cast<int>(h) - z);
  }
  float scalar_q(float v) const {  // the vector path's float operations on one value
    float t = std::nearbyint(v / s_) + z_;
    t = t > 0.f ? t : 0.f;
    return t < 255.f ? t : 255.f;
  }
};

// The exact path: nearbyint(x / s) + zp clamped into [vlo, vhi], all in float (NaN -> vlo).
static inline __m512i quant16_exact(__m512 x, const QuantScale& qs) {
  __m512 q = _mm512_roundscale_ps(_mm512_div_ps(x, qs.vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_add_ps(q, qs.vz);
  q = _mm512_max_ps(q, qs.vlo);
  q = _mm512_min_ps(q, qs.vhi);
  return _mm512_cvttps_epi32(q);
}

// Quantized values as int32 lanes in [vlo, vhi] (within [0, 255]). Fast path (see QuantScale): the
// product q' = x * r rounded to an integer n by the conversion (round to nearest even, the default
// mode), kept when q' is at least 2^-10 away from a half-integer; n is clamped into
// [vlo - zp, vhi - zp] before the zero point is added (no overflow), the same integers as the float
// clamp. Huge and NaN lanes fail the test (n is INT_MIN there) and the whole vector takes the
// exact path. (12 vector uops instead of 14: the output stage of u8 convs is bound by them.)
static inline __m512i quant16_i32(__m512 x, const QuantScale& qs) {
  if (qs.fast) {
    const __m512 q = _mm512_mul_ps(x, qs.vr);
    const __m512i n = _mm512_cvtps_epi32(q);
    const __m512 d = _mm512_abs_ps(_mm512_sub_ps(q, _mm512_cvtepi32_ps(n)));
    if (_mm512_cmp_ps_mask(d, _mm512_set1_ps(0.5f - 0x1p-10f), _CMP_NLT_UQ) == 0)
      return _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(n, qs.ilo), qs.ihi), qs.iz);
  }
  return quant16_exact(x, qs);
}

static inline __m128i quant16(__m512 x, const QuantScale& qs) { return _mm512_cvtepi32_epi8(quant16_i32(x, qs)); }

// Requantized u8 output of 16 floats: the same arithmetic as the activation quantization,
// clamp(nearbyint(y / out_scale) + out_zp, 0, 255) (and the activation when folded into qs).
static inline __m128i requant16(__m512 y, const QuantScale& qs) { return quant16(y, qs); }

// 16 u8 lanes to memory: a plain store for a full vector (the masked narrowing store the compiler
// forms otherwise, vpmovdb m128{k}, was a quarter of a u8-output conv's time).
static inline void store_u8x16(std::uint8_t* p, __mmask16 m, __m128i v) {
  if (m == 0xFFFF)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v);
  else
    _mm_mask_storeu_epi8(p, m, v);
}

// Row stride of the float tile used for transposed (conv, NCHW) output.
constexpr int kYLd = 64;

static inline bool fast_transposed(const Epilogue& ep) { return ep.ldn != 1 && ep.ldm == 1; }

// Output stage on 16 columns of one row, fully in registers. For transposed output the result
// goes to ybuf[r][j*16..] and transposed_store() writes it out column by column.
static inline void finish_vec(__m512i acc, int r, int j, const Tile& t, const Epilogue& ep,
                              __m512i csum, __m512i wzp, __m512 ws, __m512 bias, __mmask16 mask,
                              float* ybuf) {
  const __m512i rzp = _mm512_set1_epi32(t.rzp[r]);
  __m512i v = _mm512_sub_epi32(acc, _mm512_mullo_epi32(rzp, csum));
  if (ep.wzp) {
    const __m512i rsum = _mm512_set1_epi32(t.rsum[r]);
    v = _mm512_sub_epi32(v, _mm512_mullo_epi32(wzp, rsum));
    const __m512i kz = _mm512_set1_epi32(static_cast<std::int32_t>(static_cast<std::uint32_t>(ep.K) *
                                                                   static_cast<std::uint32_t>(t.rzp[r])));
    v = _mm512_add_epi32(v, _mm512_mullo_epi32(kz, wzp));
  }
  const __m512 s = _mm512_mul_ps(_mm512_set1_ps(t.rscale[r]), ws);
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(v), s);
  if (ep.bias) y = _mm512_add_ps(y, bias);
  if (ep.act == Activation::Relu) {
    y = _mm512_max_ps(y, _mm512_setzero_ps());
  } else if (ep.act == Activation::Clip) {
    y = _mm512_max_ps(y, _mm512_set1_ps(ep.lo));
    y = _mm512_min_ps(y, _mm512_set1_ps(ep.hi));
  }
  const int m = t.m + r, n = t.n + j * 16;
  if (ep.ldn == 1) {
    const std::ptrdiff_t off = static_cast<std::ptrdiff_t>(m) * ep.ldm + n;
    if (ep.requant) {
      __m512 q = _mm512_roundscale_ps(_mm512_div_ps(y, _mm512_set1_ps(ep.out_scale)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_add_ps(q, _mm512_set1_ps(ep.out_zp));
      q = _mm512_max_ps(q, _mm512_setzero_ps());
      q = _mm512_min_ps(q, _mm512_set1_ps(255.f));
      _mm_mask_storeu_epi8(ep.cu + off, mask, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(q)));
    } else {
      _mm512_mask_storeu_ps(ep.cf + off, mask, y);
    }
  } else if (fast_transposed(ep)) {
    _mm512_store_ps(ybuf + r * kYLd + j * 16, y);
  } else {
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, y);
    const int valid = t.ncols - j * 16 < 16 ? t.ncols - j * 16 : 16;
    for (int i = 0; i < valid; ++i)
      store_element(tmp[i], static_cast<std::ptrdiff_t>(m) * ep.ldm + static_cast<std::ptrdiff_t>(n + i) * ep.ldn, ep);
  }
}


// 16 rows of 16 floats (row i at src + i * ld; rows >= rows read as zero) -> col[j] = column j.
// Four shuffle stages (64 shuffles): gathers were 4x slower (the stem's transposed store was a
// third of its time).
static inline void transpose16(const float* src, int ld, int rows, __m512 col[16]) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_load_ps(src + i * ld) : _mm512_setzero_ps();
  // within 128-bit lanes L: t[2i] = a4L b4L a4L+1 b4L+1, t[2i+1] = a4L+2 b4L+2 a4L+3 b4L+3
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[g][k] = r[4g + k]: lane L holds column 4L + k of rows 4g..4g+3
  for (int g = 0; g < 4; ++g) {
    r[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  // a 4x4 transpose of 128-bit lanes across the groups, per k
  for (int k = 0; k < 4; ++k) {
    const __m512 s0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x44), s1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xEE);
    const __m512 s2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x44),
                 s3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xEE);
    col[0 + k] = _mm512_shuffle_f32x4(s0, s2, 0x88);
    col[4 + k] = _mm512_shuffle_f32x4(s0, s2, 0xDD);
    col[8 + k] = _mm512_shuffle_f32x4(s1, s3, 0x88);
    col[12 + k] = _mm512_shuffle_f32x4(s1, s3, 0xDD);
  }
}

// Column c of the tile is contiguous in the output (rows are pixels of one channel plane).
static inline void transposed_store(const float* ybuf, const Tile& t, const Epilogue& ep) {
  const QuantScale oq(ep.requant ? ep.out_scale : 1.f, ep.out_zp);
  for (int r0 = 0; r0 < t.mr; r0 += 16) {
    const __mmask16 m = col_mask(t.mr - r0);
    for (int c0 = 0; c0 < t.ncols; c0 += 16) {
      __m512 col[16];
      transpose16(ybuf + r0 * kYLd + c0, kYLd, t.mr - r0, col);
      const int nc = t.ncols - c0 < 16 ? t.ncols - c0 : 16;
      for (int c = 0; c < nc; ++c) {
        const std::ptrdiff_t off = static_cast<std::ptrdiff_t>(t.n + c0 + c) * ep.ldn + t.m + r0;
        if (ep.requant)
          store_u8x16(ep.cu + off, m, requant16(col[c], oq));
        else
          _mm512_mask_storeu_ps(ep.cf + off, m, col[c]);
      }
    }
  }
}

// The whole output stage of a tile whose int32 accumulators sit in memory (acc, row stride ld
// int32s), for transposed output without weight zero points: each 16x16 block is transposed
// first, so a column (16 pixels of one output channel) is finished in one vector with the
// column's scale, zero-point correction and bias broadcast, and stored straight into its plane.
// Same float operations in the same order as finish_vec.
static inline void transposed_tile(const std::int32_t* acc, int ld, const Tile& t, const Epilogue& ep) {
  // u8 output: the activation folds into the requantization's clamp (QuantScale::with_act)
  const bool fold = ep.requant && QuantScale::foldable(ep.act, ep.lo, ep.hi);
  const QuantScale oq = fold ? QuantScale(ep.out_scale, ep.out_zp).with_act(ep.act, ep.lo, ep.hi)
                             : QuantScale(ep.requant ? ep.out_scale : 1.f, ep.out_zp);
  const std::int32_t* const colsum = ep.colsum;
  const float* const wscale = ep.wscale;
  const float* const bias = ep.bias;
  const Activation act = fold ? Activation::None : ep.act;
  const __m512 lo = _mm512_set1_ps(ep.lo), hi = _mm512_set1_ps(ep.hi);
  const bool requant = ep.requant;
  float* const cf = ep.cf;
  std::uint8_t* const cu = ep.cu;
  const std::ptrdiff_t ldn = ep.ldn;
  for (int r0 = 0; r0 < t.mr; r0 += 16) {
    const int rows = t.mr - r0 < 16 ? t.mr - r0 : 16;
    const __mmask16 m = col_mask(rows);
    const __m512i rzp = _mm512_maskz_loadu_epi32(m, t.rzp + r0);
    const __m512 rscale = _mm512_maskz_loadu_ps(m, t.rscale + r0);
    for (int c0 = 0; c0 < t.ncols; c0 += 16) {
      __m512 col[16];
      transpose16(reinterpret_cast<const float*>(acc + r0 * ld + c0), ld, rows, col);
      const int nc = t.ncols - c0 < 16 ? t.ncols - c0 : 16;
      for (int c = 0; c < nc; ++c) {
        const int n = t.n + c0 + c;
        const __m512i v = _mm512_sub_epi32(_mm512_castps_si512(col[c]),
                                           _mm512_mullo_epi32(rzp, _mm512_set1_epi32(colsum[n])));
        __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(rscale, _mm512_set1_ps(wscale[n])));
        if (bias) y = _mm512_add_ps(y, _mm512_set1_ps(bias[n]));
        if (act == Activation::Relu) {
          y = _mm512_max_ps(y, _mm512_setzero_ps());
        } else if (act == Activation::Clip) {
          y = _mm512_max_ps(y, lo);
          y = _mm512_min_ps(y, hi);
        }
        const std::ptrdiff_t off = static_cast<std::ptrdiff_t>(n) * ldn + t.m + r0;
        if (requant)
          store_u8x16(cu + off, m, requant16(y, oq));
        else
          _mm512_mask_storeu_ps(cf + off, m, y);
      }
    }
  }
}

// The direct conv's output stage parameters, copied out of DirectConv into a local of the task:
// with u8 output every store may alias any object (a char type), so fields read through a
// reference were re-loaded after each store (VNNI 32->64 1x1 @112, u8 out: 442 -> 378 us).
struct DirectEpi {
  int nq, Wp, OW, OH;
  std::ptrdiff_t oplane;
  float* Y;
  std::uint8_t* Yu;
  const float* R;
  Activation act;
  __m512 lo, hi;
  QuantScale oq;
  std::uint32_t zp;
  float a_scale;
  const std::int32_t* wsum;
  const float* wscale;
  const float* bias;
  explicit DirectEpi(const DirectConv& d)
      : nq(d.OH * d.Wp), Wp(d.Wp), OW(d.OW), OH(d.OH), oplane(d.oplane), Y(d.Y), Yu(d.Yu), R(d.R), act(d.act),
        lo(_mm512_set1_ps(d.lo)), hi(_mm512_set1_ps(d.hi)), oq(d.Yu ? d.out_scale : 1.f, d.out_zp),
        zp(static_cast<std::uint32_t>(d.zp)), a_scale(d.a_scale), wsum(d.wsum), wscale(d.wscale), bias(d.bias) {
    if (Yu && QuantScale::foldable(act, d.lo, d.hi)) {  // u8 output: the activation folds into the clamp
      oq = oq.with_act(act, d.lo, d.hi);
      act = Activation::None;
    }
  }
};

// One output channel's constants: zero-point correction, scale, bias, plane offset.
struct DirectRow {
  __m512i corr;
  __m512 s, b;
  std::ptrdiff_t base;
};

static inline DirectRow direct_row(const DirectEpi& e, int oc) {
  DirectRow r;
  r.corr = _mm512_set1_epi32(static_cast<std::int32_t>(e.zp * static_cast<std::uint32_t>(e.wsum[oc])));
  r.s = _mm512_set1_ps(e.a_scale * e.wscale[oc]);
  r.b = e.bias ? _mm512_set1_ps(e.bias[oc]) : _mm512_setzero_ps();
  r.base = static_cast<std::ptrdiff_t>(oc) * e.oplane;
  return r;
}

// Residual (added to the `mask` lanes read from the same place the result goes), activation, store.
static inline void direct_store(const DirectEpi& e, std::ptrdiff_t off, __m512 y, __mmask16 mask) {
  if (e.R) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, e.R + off));
  if (e.act == Activation::Relu) {
    y = _mm512_max_ps(y, _mm512_setzero_ps());
  } else if (e.act == Activation::Clip) {
    y = _mm512_max_ps(y, e.lo);
    y = _mm512_min_ps(y, e.hi);
  }
  if (e.Yu)
    store_u8x16(e.Yu + off, mask, requant16(y, e.oq));
  else
    _mm512_mask_storeu_ps(e.Y + off, mask, y);
}

// Output stage of the direct conv (DirectConv in internal.h) on 16 pixels q..q+15 of one output
// channel (row), stored straight into the NCHW plane. Pixels past the last output row or in the
// padded columns (ow >= OW) are dropped. Same arithmetic as zp_correct + the output stage.
static inline void direct_finish16(const DirectEpi& e, const DirectRow& row, int q, __m512i acc) {
  if (q >= e.nq) return;
  const __m512i v = _mm512_sub_epi32(acc, row.corr);
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(v), row.s);
  if (e.bias) y = _mm512_add_ps(y, row.b);
  if (e.Wp == e.OW) {
    direct_store(e, row.base + q, y, col_mask(e.nq - q));
    return;
  }
  int oh = q / e.Wp, ow = q - oh * e.Wp, i = 0;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  while (i < 16 && oh < e.OH) {
    if (ow < e.OW) {
      const int valid = e.OW - ow < 16 - i ? e.OW - ow : 16 - i;
      const __m512 yi = i ? _mm512_permutexvar_ps(_mm512_add_epi32(iota, _mm512_set1_epi32(i)), y) : y;
      direct_store(e, row.base + static_cast<std::ptrdiff_t>(oh) * e.OW + ow, yi, col_mask(valid));
    }
    i += e.Wp - ow;
    ++oh;
    ow = 0;
  }
}
