// Weight packing, the blocked GEMM driver, and the qgemm / quantization entry points.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "driver.h"

namespace onnxopt {
namespace detail {

namespace {

// Whether vpmaddubsw is exact on these weights: each k-pair (2i, 2i+1) of a column, multiplied by
// u8 activations, must stay within int16 -- at most 128 in positive and in negative weight sum
// (255 * 128 = 32640). Always true for 7-bit weights.
bool kpairs_fit_int16(const std::int8_t* B, int K, int N, std::ptrdiff_t ldk, std::ptrdiff_t ldn) {
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; k += 2) {
      const int w0 = B[k * ldk + n * ldn], w1 = k + 1 < K ? B[(k + 1) * ldk + n * ldn] : 0;
      const int pos = std::max(w0, 0) + std::max(w1, 0), neg = std::max(-w0, 0) + std::max(-w1, 0);
      if (pos > 128 || neg > 128) return false;
    }
  }
  return true;
}

}  // namespace

std::shared_ptr<PackedB> pack_b(const std::int8_t* B, int K, int N, std::ptrdiff_t ldk, std::ptrdiff_t ldn,
                                Isa isa, const std::int8_t* w_zp) {
  if (K < 0 || N < 0) throw std::invalid_argument("onnxopt: pack_weights: negative shape");
  auto p = std::make_shared<PackedB>();
  p->ops = &ops_for(isa);
  if (isa == Isa::Avx2 && kpairs_fit_int16(B, K, N, ldk, ldn)) p->ops = &ops_avx2_u8();
  const IsaOps& o = *p->ops;
  const int panel_cols = o.NR * o.NB;
  p->K_ = K;
  p->N_ = N;
  p->Kp = round_up(K, o.kpad);
  p->Np = round_up(N, panel_cols);
  const int groups = p->Kp / o.KR;
  p->panel_bytes = static_cast<std::size_t>(groups) * panel_cols * o.KR * o.elem;
  const int np = p->panels();
  const std::size_t bytes = p->panel_bytes * static_cast<std::size_t>(np);
  p->data = aligned_alloc_n<std::int8_t>(bytes);
  std::memset(p->data.get(), 0, bytes + 64);
  for (int pi = 0; pi < np; ++pi) {
    const int n0 = pi * panel_cols;
    const int nb = std::min(o.NB, (N - n0 + o.NR - 1) / o.NR);
    std::int8_t* dst = p->data.get() + static_cast<std::size_t>(pi) * p->panel_bytes;
    for (int g = 0; g < groups; ++g) {
      for (int j = 0; j < nb * o.NR; ++j) {
        for (int kk = 0; kk < o.KR; ++kk) {
          const int k = g * o.KR + kk, n = n0 + j;
          const std::int8_t v = (k < K && n < N) ? B[k * ldk + n * ldn] : 0;
          const std::size_t idx = ((static_cast<std::size_t>(g) * nb * o.NR) + j) * o.KR + kk;
          if (o.elem == 1) {
            dst[idx] = v;
          } else {
            const std::int16_t w = v;
            std::memcpy(dst + idx * 2, &w, 2);
          }
        }
      }
    }
  }
  p->colsum.assign(p->Np, 0);
  for (int n = 0; n < N; ++n) {
    std::int32_t s = 0;
    for (int k = 0; k < K; ++k) s += B[k * ldk + n * ldn];
    p->colsum[n] = s;
  }
  if (w_zp) {
    bool any = false;
    for (int n = 0; n < N; ++n) any |= w_zp[n] != 0;
    if (any) {
      p->wzp.assign(p->Np, 0);
      for (int n = 0; n < N; ++n) p->wzp[n] = w_zp[n];
    }
  }
  return p;
}

void dynamic_params(float lo, float hi, float* scale, float* zpf) {
  const float s = (hi == lo) ? 1.f : (hi - lo) / 255.f;
  float z = std::nearbyint(-lo / s);
  z = z > 0.f ? z : 0.f;
  z = z < 255.f ? z : 255.f;
  *scale = s;
  *zpf = z;
}

std::vector<float> expand_scale(const OutputStage& st, int N) {
  if (!st.w_scale) throw std::invalid_argument("onnxopt: output stage without w_scale");
  if (st.per_column) return std::vector<float>(st.w_scale, st.w_scale + N);
  return std::vector<float>(static_cast<std::size_t>(N), st.w_scale[0]);
}

namespace {

// Row stride of the packed A block. A multiple of 512 bytes puts the 16 rows of an A tile (AMX) or
// the MR rows of a micro-tile into a few L1 sets only (K = 1024: 4 of 64 sets), and they evict each
// other and the B panel; one extra cache line per row spreads them over all sets.
int a_block_stride(int Kp) {
  const int lda = std::max(Kp, 4);
  return lda % 512 == 0 ? lda + 64 : lda;
}

}  // namespace

void gemm_task(void* data, std::size_t i) {
  const GemmJob& job = *static_cast<const GemmJob*>(data);
  const PackedB& B = *job.B;
  const IsaOps& o = *B.ops;
  const int mi = static_cast<int>(i) / job.nchunks, ni = static_cast<int>(i) % job.nchunks;
  const int np = B.panels();
  const int row0 = static_cast<int>(static_cast<long long>(job.mtiles) * mi / job.mchunks) * o.MR;
  const int row1 = std::min(job.M, static_cast<int>(static_cast<long long>(job.mtiles) * (mi + 1) / job.mchunks) * o.MR);
  const int p0 = static_cast<int>(static_cast<long long>(np) * ni / job.nchunks);
  const int p1 = static_cast<int>(static_cast<long long>(np) * (ni + 1) / job.nchunks);
  if (row0 >= row1 || p0 >= p1) return;
  const int mc = std::min(job.mc, row1 - row0);
  const int lda = a_block_stride(B.Kp);
  // In-place A: full micro-tiles read the caller's rows directly (no copy) when no K padding is
  // needed; only a ragged last tile of rows goes through the buffer. Rows that straddle cache
  // lines cost twice on every pass over a column panel, so unaligned A is read in place only when
  // it is swept at most twice (few panels); otherwise the aligned copy pays for itself.
  const bool aligned = (reinterpret_cast<std::uintptr_t>(job.src.direct) % 64 == 0) && job.src.direct_lda % 64 == 0;
  const bool in_place = job.src.direct && job.src.params && B.Kp == B.K_ && B.K_ > 0 &&
                        job.src.direct_lda <= std::numeric_limits<int>::max() && (aligned || p1 - p0 <= 2);
  const int bufrows = in_place ? o.MR : round_up(mc, o.MR);
  auto abuf = aligned_alloc_n<std::uint8_t>(static_cast<std::size_t>(bufrows) * lda);
  std::vector<std::int32_t> zp(mc), rsum(B.wzp.empty() ? 0 : mc);
  std::vector<float> scale(mc);
  const int panel_cols = o.NR * o.NB;
  int zeroed_rows = 0;  // buffer rows whose K padding is zero
  if (o.task_begin) o.task_begin();
  for (int m0 = row0; m0 < row1; m0 += mc) {
    const int mb = std::min(mc, row1 - m0);
    const int nfull = in_place ? mb / o.MR * o.MR : 0;  // rows read in place
    if (nfull) job.src.params(job.src.ctx, m0, nfull, zp.data(), scale.data());
    if (nfull < mb) {
      const int rows = mb - nfull;
      std::uint8_t* buf = abuf.get();
      // The fill writes bytes [0, K) of each row; zero the K padding (once per buffer row: no fill
      // writes there, and a memset call per row of each block was a quarter of a 3-channel stem)
      // and the tile's spare rows.
      if (lda > B.K_ && rows > zeroed_rows) {
        std::memset(buf + static_cast<std::size_t>(zeroed_rows) * lda, 0, static_cast<std::size_t>(rows - zeroed_rows) * lda);
        zeroed_rows = rows;
      }
      const int rpad = round_up(rows, o.MR);
      if (rpad > rows) std::memset(buf + static_cast<std::size_t>(rows) * lda, 0, static_cast<std::size_t>(rpad - rows) * lda);
      job.src.fill(job.src.ctx, m0 + nfull, rows, buf, lda, zp.data() + nfull, scale.data() + nfull);
    }
    auto row_ptr = [&](int r) -> const std::uint8_t* {
      return r < nfull ? job.src.direct + static_cast<std::ptrdiff_t>(m0 + r) * job.src.direct_lda
                       : abuf.get() + static_cast<std::size_t>(r - nfull) * lda;
    };
    const int tlda_direct = static_cast<int>(job.src.direct_lda);
    if (!rsum.empty()) {
      for (int r = 0; r < mb; ++r) {
        const std::uint8_t* a = row_ptr(r);
        std::int32_t s = 0;
        for (int k = 0; k < B.K_; ++k) s += a[k];
        rsum[r] = s;
      }
    }
    for (int p = p0; p < p1; ++p) {
      const int n0 = p * panel_cols;
      const int ncols = std::min(panel_cols, B.N_ - n0);
      Tile t;
      t.B = B.panel(p);
      t.Kp = B.Kp;
      t.nb = (ncols + o.NR - 1) / o.NR;
      t.ncols = ncols;
      t.n = n0;
      for (int r = 0; r < mb; r += o.MR) {
        t.A = row_ptr(r);
        t.lda = r < nfull ? tlda_direct : lda;
        t.mr = std::min(o.MR, mb - r);
        t.m = m0 + r;
        t.rzp = zp.data() + r;
        t.rscale = scale.data() + r;
        t.rsum = rsum.empty() ? nullptr : rsum.data() + r;
        o.tile(t, job.ep);
      }
    }
  }
  if (o.task_end) o.task_end();
}

GemmJob plan_gemm(const PackedB& B, int M, const ASource& src, Epilogue ep, const Parallel& par, bool wake_hidden) {
  const IsaOps& o = *B.ops;
  ep.K = B.K_;
  ep.colsum = B.colsum.data();
  ep.wzp = B.wzp.empty() ? nullptr : B.wzp.data();
  GemmJob job{&B, M, src, ep, 0, 1, 1, 0, false};
  job.mtiles = (M + o.MR - 1) / o.MR;
  // Rows per A block: keep the packed block around 256 KB so it stays in L2 while B panels stream.
  const int lda = a_block_stride(B.Kp);
  job.mc = std::max(o.MR, (256 * 1024 / lda) / o.MR * o.MR);
  // ... but never split a small M into two blocks (each block streams all of B again): one block
  // when every row fits in 1.5x that budget (e.g. 49 x 4608).
  if (static_cast<long long>(round_up(M, o.MR)) * lda <= 384 * 1024) job.mc = round_up(M, o.MR);
  const int np = B.panels();
  // A task must carry enough work to pay for waking a thread (tens of microseconds on a shared
  // pool): below kMinMacsPerTask per task, use fewer tasks; small GEMMs run on the calling thread.
  // Without a spinning pool every region also pays a thread wake-up: 4x more work per task.
  // (wake_hidden: the caller runs the tasks with run_after, the wake-up overlaps its prologue)
  const long long min_macs = (par.cheap_wake || wake_hidden) ? (1LL << 23) : (1LL << 25);
  const long long macs = static_cast<long long>(M) * B.K_ * B.N_;
  const long long max_tasks = std::max(1LL, macs / min_macs);
  const int degree = (par.run && par.degree > 1) ? static_cast<int>(std::min<long long>(par.degree, max_tasks)) : 1;
  if (degree > 1) {
    // Split rows first (each task packs/quantizes only its own rows); split columns only when
    // there are too few row tiles to keep every thread busy.
    // With few tasks, a whole number of rounds: 3 equal tasks on 2 threads take 2 task times.
    int target = static_cast<int>(std::min<long long>(4LL * degree, max_tasks));
    target = std::max(degree, target / degree * degree);
    // Every row chunk streams all of B, every column chunk quantizes/packs all of its rows. When the
    // packed weights outweigh the float rows (e.g. 128 x 768 x 3072: 2.4 MB against 0.4 MB, and
    // eight row chunks read B from L3 eight times), split the columns only, one chunk per thread.
    const long long b_bytes = static_cast<long long>(B.Kp) * B.N_;
    const long long a_bytes = static_cast<long long>(M) * B.K_ * 4;
    if (b_bytes > 2 * a_bytes && b_bytes > (1LL << 20) && np >= degree) {
      job.mchunks = 1;
      job.nchunks = degree;
    } else {
      job.mchunks = std::min(job.mtiles, target);
      if (job.mchunks < 2 * degree) job.nchunks = std::min(np, (target + job.mchunks - 1) / job.mchunks);
    }
  }
  job.parallel = degree > 1;
  return job;
}

void run_gemm(const PackedB& B, int M, const ASource& src, Epilogue ep, const Parallel& par) {
  if (M <= 0 || B.N_ <= 0) return;
  GemmJob job = plan_gemm(B, M, src, ep, par, false);
  const std::size_t n = static_cast<std::size_t>(job.mchunks) * job.nchunks;
  if (!job.parallel) {  // one task, on this thread: no pool round trip
    for (std::size_t i = 0; i < n; ++i) gemm_task(&job, i);
    return;
  }
  par(gemm_task, n, &job);
}

}  // namespace detail

using namespace detail;

std::shared_ptr<const PackedWeights> pack_weights(const std::int8_t* B, int K, int N, Isa isa, const std::int8_t* w_zp) {
  return pack_b(B, K, N, N, 1, isa, w_zp);
}

namespace {

const PackedB& as_packed(const PackedWeights& w) {
  const auto* p = dynamic_cast<const PackedB*>(&w);
  if (!p) throw std::invalid_argument("onnxopt: weights were not packed by pack_weights");
  return *p;
}

Epilogue make_epilogue(const OutputStage& st, const float* wscale) {
  Epilogue ep;
  ep.wscale = wscale;
  ep.bias = st.bias;
  ep.act = st.act;
  ep.lo = st.clip_lo;
  ep.hi = st.clip_hi;
  ep.requant = st.requant;
  ep.out_scale = st.out_scale;
  ep.out_zp = static_cast<float>(st.out_zp);
  return ep;
}

struct U8Source {
  const std::uint8_t* A;
  int lda, K;
  const std::uint8_t* zp;
  const float* scale;
  bool per_row;
};

void fill_u8(const void* ctx, int m0, int mb, std::uint8_t* buf, int ldb, std::int32_t* zp, float* scale) {
  const U8Source& s = *static_cast<const U8Source*>(ctx);
  for (int r = 0; r < mb; ++r) {
    const int m = m0 + r;
    if (s.K) std::memcpy(buf + static_cast<std::size_t>(r) * ldb, s.A + static_cast<std::size_t>(m) * s.lda, s.K);
    zp[r] = s.per_row ? s.zp[m] : s.zp[0];
    scale[r] = s.per_row ? s.scale[m] : s.scale[0];
  }
}

void params_u8(const void* ctx, int m0, int mb, std::int32_t* zp, float* scale) {
  const U8Source& s = *static_cast<const U8Source*>(ctx);
  for (int r = 0; r < mb; ++r) {
    const int m = m0 + r;
    zp[r] = s.per_row ? s.zp[m] : s.zp[0];
    scale[r] = s.per_row ? s.scale[m] : s.scale[0];
  }
}

struct F32Source {
  const float* A;
  int lda, K;
  const float* x_scale;  // static when non-null
  float x_zpf;
  const IsaOps* ops;
};

void fill_f32(const void* ctx, int m0, int mb, std::uint8_t* buf, int ldb, std::int32_t* zp, float* scale) {
  const F32Source& s = *static_cast<const F32Source*>(ctx);
  for (int r = 0; r < mb; ++r) {
    const float* x = s.A + static_cast<std::size_t>(m0 + r) * s.lda;
    float sc, z;
    if (s.x_scale) {
      sc = *s.x_scale;
      z = s.x_zpf;
    } else {
      float lo = 0.f, hi = 0.f;
      s.ops->minmax(x, s.K, &lo, &hi);
      dynamic_params(lo, hi, &sc, &z);
    }
    s.ops->quant(x, s.K, sc, z, buf + static_cast<std::size_t>(r) * ldb);
    zp[r] = static_cast<std::int32_t>(z);
    scale[r] = sc;
  }
}

}  // namespace

void qgemm(const std::uint8_t* A, int M, int lda, const std::uint8_t* a_zp, const float* a_scale, bool per_row_a,
           const PackedWeights& Bw, const OutputStage& stage, float* c_f32, std::uint8_t* c_u8, int ldc,
           const Parallel& par) {
  const PackedB& B = as_packed(Bw);
  if (M < 0 || lda < B.K_ || ldc < B.N_) throw std::invalid_argument("onnxopt: qgemm: bad shape or stride");
  if (!a_zp || !a_scale) throw std::invalid_argument("onnxopt: qgemm: missing activation zero point / scale");
  if (stage.requant ? !c_u8 : !c_f32) throw std::invalid_argument("onnxopt: qgemm: missing output buffer");
  const std::vector<float> ws = expand_scale(stage, B.N_);
  Epilogue ep = make_epilogue(stage, ws.data());
  ep.cf = c_f32;
  ep.cu = c_u8;
  ep.ldm = ldc;
  U8Source src{A, lda, B.K_, a_zp, a_scale, per_row_a};
  ASource as{fill_u8, &src};
  as.direct = A;
  as.direct_lda = lda;
  as.params = params_u8;
  run_gemm(B, M, as, ep, par);
}

void qgemm_f32(const float* A, int M, int lda, const float* x_scale, const std::uint8_t* x_zp, const PackedWeights& Bw,
               const OutputStage& stage, float* C, int ldc, const Parallel& par) {
  const PackedB& B = as_packed(Bw);
  if (M < 0 || lda < B.K_ || ldc < B.N_) throw std::invalid_argument("onnxopt: qgemm_f32: bad shape or stride");
  if (stage.requant) throw std::invalid_argument("onnxopt: qgemm_f32 produces float output (requant unsupported)");
  if (!C) throw std::invalid_argument("onnxopt: qgemm_f32: missing output buffer");
  const std::vector<float> ws = expand_scale(stage, B.N_);
  Epilogue ep = make_epilogue(stage, ws.data());
  ep.cf = C;
  ep.ldm = ldc;
  F32Source src{A, lda, B.K_, x_scale, x_scale ? static_cast<float>(x_zp ? *x_zp : 0) : 0.f, B.ops};
  run_gemm(B, M, ASource{fill_f32, &src}, ep, par);
}

void quantize_rows_dynamic(const float* x, int M, int K, int ldx, std::uint8_t* q, int ldq, float* scale,
                           std::uint8_t* zp, Isa isa) {
  const IsaOps& o = ops_for(isa);
  for (int m = 0; m < M; ++m) {
    const float* row = x + static_cast<std::size_t>(m) * ldx;
    float lo = 0.f, hi = 0.f, s, z;
    o.minmax(row, K, &lo, &hi);
    dynamic_params(lo, hi, &s, &z);
    o.quant(row, K, s, z, q + static_cast<std::size_t>(m) * ldq);
    scale[m] = s;
    zp[m] = static_cast<std::uint8_t>(z);
  }
}

void quantize_rows_dynamic(const float* x, int M, int K, int ldx, std::uint8_t* q, int ldq, float* scale,
                           std::uint8_t* zp) {
  quantize_rows_dynamic(x, M, K, ldx, q, ldq, scale, zp, active_isa());
}

void quantize_static(const float* x, std::size_t n, float scale, std::uint8_t zp, std::uint8_t* q, Isa isa) {
  ops_for(isa).quant(x, n, scale, static_cast<float>(zp), q);
}

void quantize_static(const float* x, std::size_t n, float scale, std::uint8_t zp, std::uint8_t* q) {
  quantize_static(x, n, scale, zp, q, active_isa());
}

}  // namespace onnxopt
