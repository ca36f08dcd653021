// onnxopt._kernels: thin pybind11 bindings over csrc/kernels. Arrays in, arrays out; the GIL is
// released around every compute call. Threads: a small persistent std::thread pool; each call
// takes `threads` (None = the module default, which is 1 = serial until set_num_threads()).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "onnxopt_kernels.h"

namespace py = pybind11;
using onnxopt::Activation;
using onnxopt::Isa;

namespace {

// ---------------------------------------------------------------------------------------------
// Thread pool: one reusable job slot. A call publishes the job (generation counter), works on it
// too, closes it and waits until every helper that joined has left. Idle workers spin on the
// generation for ~200 us before sleeping on a condition variable, so back-to-back calls (a model's
// layers) do not pay a futex wake-up per call; the caller spins (then yields) while helpers finish.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive interpreter teardown
    return *pool;
  }

  void run(void (*fn)(void*, std::size_t), std::size_t total, void* data, int degree) {
    std::lock_guard<std::mutex> call(call_mu_);
    ensure_workers(degree - 1);
    // Between calls the slot is closed and no helper is active: the fields are ours to write.
    slot_.fn = fn;
    slot_.data = data;
    slot_.total = total;
    slot_.max_helpers = degree - 1;
    slot_.next.store(0);
    slot_.joined.store(0);
    slot_.closed.store(false);  // fields complete: a helper that sees the slot open may join
    gen_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    work(slot_);
    slot_.closed.store(true);
    for (unsigned spins = 0; slot_.active.load() != 0; ++spins) {
      if (spins < 4096)
        cpu_relax();
      else
        std::this_thread::yield();
    }
  }

 private:
  struct Slot {
    void (*fn)(void*, std::size_t) = nullptr;
    void* data = nullptr;
    std::size_t total = 0;
    int max_helpers = 0;
    std::atomic<std::size_t> next{0};
    std::atomic<int> joined{0}, active{0};
    std::atomic<bool> closed{true};
  };

  static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  static void work(Slot& j) {
    for (;;) {
      const std::size_t i = j.next.fetch_add(1);
      if (i >= j.total) return;
      j.fn(j.data, i);
    }
  }

  // A helper counts itself active before looking at the slot; the caller closes the slot before
  // waiting for active == 0, so a helper either sees it closed and backs out or is waited for.
  // (Seeing an open slot of a newer generation is fine: its fields are complete by then.)
  void join() {
    slot_.active.fetch_add(1);
    if (!slot_.closed.load() && slot_.joined.fetch_add(1) < slot_.max_helpers) work(slot_);
    slot_.active.fetch_sub(1);
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) workers_.emplace_back([this] { loop(); });
  }

  void loop() {
    std::uint64_t seen = gen_.load();
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      bool woke = false;
      for (unsigned spins = 0;; ++spins) {
        if (gen_.load() != seen) {
          woke = true;
          break;
        }
        cpu_relax();
        if ((spins & 63) == 63 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(200)) break;
      }
      if (!woke) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lk, [&] { return gen_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = gen_.load();
      join();
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  Slot slot_;
  std::atomic<std::uint64_t> gen_{0};
  std::atomic<int> sleepers_{0};
};

int g_default_threads = 1;

int resolve_threads(std::optional<int> threads) {
  int t = threads.value_or(g_default_threads);
  if (t <= 0) t = static_cast<int>(std::thread::hardware_concurrency());
  return t < 1 ? 1 : t;
}

void pool_run(void* ctx, void (*fn)(void*, std::size_t), std::size_t total, void* data) {
  const int degree = *static_cast<int*>(ctx);
  Pool::get().run(fn, total, data, degree);
}

struct ParallelHolder {
  int degree;
  onnxopt::Parallel par;
  explicit ParallelHolder(int d) : degree(d) {
    par.degree = d;
    if (d > 1) {
      par.run = pool_run;
      par.ctx = &degree;
    }
  }
  ParallelHolder(const ParallelHolder&) = delete;
};

// ---------------------------------------------------------------------------------------------
Isa parse_isa(const std::optional<std::string>& s) {
  if (!s) return onnxopt::active_isa();
  if (*s == "scalar") return Isa::Scalar;
  if (*s == "avx2") return Isa::Avx2;
  if (*s == "avx512vnni") return Isa::Avx512Vnni;
  if (*s == "amx") return Isa::Amx;
  throw std::invalid_argument("onnxopt: unknown isa '" + *s + "' (scalar, avx2, avx512vnni, amx)");
}

Activation parse_act(const std::string& s) {
  if (s == "none") return Activation::None;
  if (s == "relu") return Activation::Relu;
  if (s == "clip") return Activation::Clip;
  throw std::invalid_argument("onnxopt: unknown activation '" + s + "' (none, relu, clip)");
}

template <class T>
using CArr = py::array_t<T, py::array::c_style | py::array::forcecast>;

struct PackedW {
  std::shared_ptr<const onnxopt::PackedWeights> w;
};
struct PackedC {
  std::shared_ptr<const onnxopt::PackedConv> w;
  int Cg;
};

// Per-column or per-tensor float vector of length n (or 1).
const float* vec_or_scalar(const CArr<float>& a, py::ssize_t n, const char* what, bool* per) {
  if (a.size() == n && a.ndim() == 1 && n != 1) {
    *per = true;
  } else if (a.size() == 1) {
    *per = false;
  } else {
    throw std::invalid_argument(std::string("onnxopt: ") + what + " must have 1 or " + std::to_string(n) + " entries");
  }
  return a.data();
}

onnxopt::OutputStage make_stage(const CArr<float>& w_scale, const std::optional<CArr<float>>& bias, py::ssize_t n,
                                const std::string& activation, float clip_lo, float clip_hi) {
  onnxopt::OutputStage st;
  st.w_scale = vec_or_scalar(w_scale, n, "w_scale", &st.per_column);
  if (bias) {
    if (bias->size() != n) throw std::invalid_argument("onnxopt: bias must have one entry per output column/channel");
    st.bias = bias->data();
  }
  st.act = parse_act(activation);
  st.clip_lo = clip_lo;
  st.clip_hi = clip_hi;
  return st;
}

py::dict info() {
  py::dict d;
  d["detected_isa"] = onnxopt::isa_name(onnxopt::detected_isa());
  d["active_isa"] = onnxopt::isa_name(onnxopt::active_isa());
  const char* env = std::getenv("ONNXOPT_ISA");
  d["requested_isa"] = env ? py::object(py::str(env)) : py::object(py::none());
  d["default_threads"] = g_default_threads;
  // an optimized build without sanitizers: the one whose hot loops tools/check_codegen.py judges
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ONNXOPT_ASAN 1
#endif
#endif
#if defined(__OPTIMIZE__) && !defined(__SANITIZE_ADDRESS__) && !defined(ONNXOPT_ASAN)
  d["release_codegen"] = true;
#else
  d["release_codegen"] = false;
#endif
  d["hardware_concurrency"] = static_cast<int>(std::thread::hardware_concurrency());
  return d;
}

PackedW pack_weights(const CArr<std::int8_t>& w, const std::optional<CArr<std::int8_t>>& w_zp,
                     const std::optional<std::string>& isa) {
  if (w.ndim() != 2) throw std::invalid_argument("onnxopt: pack_weights expects w[K, N]");
  const int K = static_cast<int>(w.shape(0)), N = static_cast<int>(w.shape(1));
  const std::int8_t* zp = nullptr;
  std::vector<std::int8_t> zpv;
  if (w_zp) {
    if (w_zp->size() == 1) {
      zpv.assign(N, w_zp->data()[0]);
    } else if (w_zp->size() == N) {
      zpv.assign(w_zp->data(), w_zp->data() + N);
    } else {
      throw std::invalid_argument("onnxopt: w_zp must have 1 or N entries");
    }
    zp = zpv.data();
  }
  const Isa i = parse_isa(isa);
  py::gil_scoped_release nogil;
  return PackedW{onnxopt::pack_weights(w.data(), K, N, i, zp)};
}

py::array qgemm(const CArr<std::uint8_t>& a, const CArr<std::uint8_t>& a_zp, const CArr<float>& a_scale,
                const PackedW& pw, const CArr<float>& w_scale, const std::optional<CArr<float>>& bias,
                const std::string& activation, float clip_lo, float clip_hi, std::optional<float> out_scale,
                int out_zp, std::optional<int> threads) {
  const auto& B = *pw.w;
  if (a.ndim() != 2 || a.shape(1) != B.K()) throw std::invalid_argument("onnxopt: qgemm expects a[M, K] matching the weights");
  const int M = static_cast<int>(a.shape(0)), K = B.K(), N = B.N();
  bool per_row;
  if (a_zp.size() != a_scale.size()) throw std::invalid_argument("onnxopt: a_zp and a_scale must have the same size");
  vec_or_scalar(a_scale, M, "a_scale", &per_row);
  onnxopt::OutputStage st = make_stage(w_scale, bias, N, activation, clip_lo, clip_hi);
  if (out_scale) {
    if (out_zp < 0 || out_zp > 255) throw std::invalid_argument("onnxopt: out_zp must be in [0, 255]");
    st.requant = true;
    st.out_scale = *out_scale;
    st.out_zp = static_cast<std::uint8_t>(out_zp);
  }
  ParallelHolder ph(resolve_threads(threads));
  if (st.requant) {
    py::array_t<std::uint8_t> out({M, N});
    std::uint8_t* o = out.mutable_data();
    py::gil_scoped_release nogil;
    onnxopt::qgemm(a.data(), M, K, a_zp.data(), a_scale.data(), per_row, B, st, nullptr, o, N, ph.par);
    return std::move(out);
  }
  py::array_t<float> out({M, N});
  float* o = out.mutable_data();
  py::gil_scoped_release nogil;
  onnxopt::qgemm(a.data(), M, K, a_zp.data(), a_scale.data(), per_row, B, st, o, nullptr, N, ph.par);
  return std::move(out);
}

py::array qgemm_f32(const CArr<float>& x, const PackedW& pw, const CArr<float>& w_scale,
                    const std::optional<CArr<float>>& bias, const std::string& activation, float clip_lo,
                    float clip_hi, std::optional<float> x_scale, int x_zp, std::optional<int> threads) {
  const auto& B = *pw.w;
  if (x.ndim() != 2 || x.shape(1) != B.K()) throw std::invalid_argument("onnxopt: qgemm_f32 expects x[M, K] matching the weights");
  const int M = static_cast<int>(x.shape(0)), K = B.K(), N = B.N();
  onnxopt::OutputStage st = make_stage(w_scale, bias, N, activation, clip_lo, clip_hi);
  if (x_zp < 0 || x_zp > 255) throw std::invalid_argument("onnxopt: x_zp must be in [0, 255]");
  const float xs = x_scale.value_or(1.f);
  const std::uint8_t xz = static_cast<std::uint8_t>(x_zp);
  ParallelHolder ph(resolve_threads(threads));
  py::array_t<float> out({M, N});
  float* o = out.mutable_data();
  py::gil_scoped_release nogil;
  onnxopt::qgemm_f32(x.data(), M, K, x_scale ? &xs : nullptr, x_scale ? &xz : nullptr, B, st, o, N, ph.par);
  return std::move(out);
}

py::tuple quantize_rows_dynamic(const CArr<float>& x, const std::optional<std::string>& isa) {
  if (x.ndim() != 2) throw std::invalid_argument("onnxopt: quantize_rows_dynamic expects x[M, K]");
  const int M = static_cast<int>(x.shape(0)), K = static_cast<int>(x.shape(1));
  py::array_t<std::uint8_t> q({M, K});
  py::array_t<float> scale(M);
  py::array_t<std::uint8_t> zp(M);
  const Isa i = parse_isa(isa);
  {
    std::uint8_t* qp = q.mutable_data();
    float* sp = scale.mutable_data();
    std::uint8_t* zpp = zp.mutable_data();
    py::gil_scoped_release nogil;
    onnxopt::quantize_rows_dynamic(x.data(), M, K, K, qp, K, sp, zpp, i);
  }
  return py::make_tuple(q, scale, zp);
}

py::array quantize_static(const CArr<float>& x, float scale, int zp, const std::optional<std::string>& isa) {
  if (zp < 0 || zp > 255) throw std::invalid_argument("onnxopt: zp must be in [0, 255]");
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  py::array_t<std::uint8_t> q(shape);
  const Isa i = parse_isa(isa);
  std::uint8_t* qp = q.mutable_data();
  py::gil_scoped_release nogil;
  onnxopt::quantize_static(x.data(), static_cast<std::size_t>(x.size()), scale, static_cast<std::uint8_t>(zp), qp, i);
  return std::move(q);
}

PackedC pack_conv_weights(const CArr<std::int8_t>& w, int C, int group, std::vector<int> strides, std::vector<int> pads,
                          std::vector<int> dilations, const std::optional<std::string>& isa) {
  if (w.ndim() != 4) throw std::invalid_argument("onnxopt: pack_conv_weights expects w[M, C/group, kH, kW]");
  if (strides.size() != 2 || dilations.size() != 2 || pads.size() != 4)
    throw std::invalid_argument("onnxopt: strides/dilations need 2 entries, pads 4 (top, left, bottom, right)");
  onnxopt::ConvParams p;
  p.C = C;
  p.M = static_cast<int>(w.shape(0));
  p.group = group;
  p.kH = static_cast<int>(w.shape(2));
  p.kW = static_cast<int>(w.shape(3));
  p.stride_h = strides[0], p.stride_w = strides[1];
  p.dil_h = dilations[0], p.dil_w = dilations[1];
  p.pad_top = pads[0], p.pad_left = pads[1], p.pad_bottom = pads[2], p.pad_right = pads[3];
  if (group <= 0 || C % group || w.shape(1) != C / group)
    throw std::invalid_argument("onnxopt: weight shape does not match C/group");
  const Isa i = parse_isa(isa);
  py::gil_scoped_release nogil;
  return PackedC{onnxopt::pack_conv_weights(w.data(), p, i), C / group};
}

// Argument checks and the output stage shared by the float and the uint8 entry points.
struct ConvCall {
  int N, H, W, OH, OW;
  onnxopt::OutputStage st;
};

template <class T>
ConvCall conv_call(const CArr<T>& x, const PackedC& pc, const CArr<float>& w_scale,
                   const std::optional<CArr<float>>& bias, const std::string& activation, float clip_lo,
                   float clip_hi, int x_zp, const std::optional<CArr<float>>& residual) {
  const onnxopt::ConvParams& p = pc.w->params();
  if (x.ndim() != 4 || x.shape(1) != p.C) throw std::invalid_argument("onnxopt: qconv2d expects x[N, C, H, W] with C matching the weights");
  ConvCall c;
  c.N = static_cast<int>(x.shape(0)), c.H = static_cast<int>(x.shape(2)), c.W = static_cast<int>(x.shape(3));
  c.OH = onnxopt::conv_out_dim(c.H, p.kH, p.stride_h, p.dil_h, p.pad_top, p.pad_bottom);
  c.OW = onnxopt::conv_out_dim(c.W, p.kW, p.stride_w, p.dil_w, p.pad_left, p.pad_right);
  if (c.OH <= 0 || c.OW <= 0) throw std::invalid_argument("onnxopt: qconv2d: input smaller than the kernel");
  c.st = make_stage(w_scale, bias, p.M, activation, clip_lo, clip_hi);
  if (x_zp < 0 || x_zp > 255) throw std::invalid_argument("onnxopt: x_zp must be in [0, 255]");
  if (residual) {
    if (residual->ndim() != 4 || residual->shape(0) != c.N || residual->shape(1) != p.M ||
        residual->shape(2) != c.OH || residual->shape(3) != c.OW)
      throw std::invalid_argument("onnxopt: qconv2d: residual must have the output's shape [N, M, OH, OW]");
    c.st.residual = residual->data();
  }
  return c;
}

py::array qconv2d_f32(const CArr<float>& x, const PackedC& pc, const CArr<float>& w_scale,
                      const std::optional<CArr<float>>& bias, const std::string& activation, float clip_lo,
                      float clip_hi, std::optional<float> x_scale, int x_zp, std::optional<int> threads,
                      const std::optional<CArr<float>>& residual) {
  ConvCall c = conv_call(x, pc, w_scale, bias, activation, clip_lo, clip_hi, x_zp, residual);
  const float xs = x_scale.value_or(1.f);
  const std::uint8_t xz = static_cast<std::uint8_t>(x_zp);
  ParallelHolder ph(resolve_threads(threads));
  py::array_t<float> out({c.N, pc.w->params().M, c.OH, c.OW});
  float* o = out.mutable_data();
  py::gil_scoped_release nogil;
  onnxopt::qconv2d_f32(x.data(), c.N, c.H, c.W, x_scale ? &xs : nullptr, x_scale ? &xz : nullptr, *pc.w, c.st, o,
                       ph.par);
  return std::move(out);
}

py::array qconv2d_u8(const CArr<std::uint8_t>& x, const PackedC& pc, const CArr<float>& w_scale,
                     const std::optional<CArr<float>>& bias, const std::string& activation, float clip_lo,
                     float clip_hi, float x_scale, int x_zp, float y_scale, int y_zp, std::optional<int> threads,
                     const std::optional<CArr<float>>& residual) {
  ConvCall c = conv_call(x, pc, w_scale, bias, activation, clip_lo, clip_hi, x_zp, residual);
  if (y_zp < 0 || y_zp > 255) throw std::invalid_argument("onnxopt: y_zp must be in [0, 255]");
  c.st.requant = true;
  c.st.out_scale = y_scale;
  c.st.out_zp = static_cast<std::uint8_t>(y_zp);
  ParallelHolder ph(resolve_threads(threads));
  py::array_t<std::uint8_t> out({c.N, pc.w->params().M, c.OH, c.OW});
  std::uint8_t* o = out.mutable_data();
  py::gil_scoped_release nogil;
  onnxopt::qconv2d_u8(x.data(), c.N, c.H, c.W, x_scale, static_cast<std::uint8_t>(x_zp), *pc.w, c.st, o, ph.par);
  return std::move(out);
}

// Core clock estimate: a chain of dependent 64-bit multiplies (3-cycle latency on every x86 core
// of the last decade; adds are not used because recent cores fold dependent add-immediates).
double estimate_ghz() {
  py::gil_scoped_release nogil;
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    std::uint64_t x = 1, y = 3;
    const std::uint64_t iters = 10'000'000;
    const auto t0 = std::chrono::steady_clock::now();
    for (std::uint64_t i = 0; i < iters; ++i) {
      __asm__ volatile(
          "imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\t"
          "imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\t"
          : "+r"(x) : "r"(y));
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 3.0 * 8.0 * iters / s / 1e9);
  }
  return best;
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "onnxopt int8 kernels (native backend). Use onnxopt.kernels, not this module directly.";
  py::register_exception<std::invalid_argument>(m, "KernelArgumentError", PyExc_ValueError);

  py::class_<PackedW>(m, "PackedWeights")
      .def_property_readonly("K", [](const PackedW& p) { return p.w->K(); })
      .def_property_readonly("N", [](const PackedW& p) { return p.w->N(); })
      .def_property_readonly("isa", [](const PackedW& p) { return onnxopt::isa_name(p.w->isa()); })
      .def_property_readonly("kernel", [](const PackedW& p) { return std::string(p.w->kernel()); })
      .def("__repr__", [](const PackedW& p) {
        return "<PackedWeights K=" + std::to_string(p.w->K()) + " N=" + std::to_string(p.w->N()) +
               " isa=" + onnxopt::isa_name(p.w->isa()) + ">";
      });
  py::class_<PackedC>(m, "PackedConv")
      .def_property_readonly("isa", [](const PackedC& p) { return onnxopt::isa_name(onnxopt::packed_conv_isa(*p.w)); })
      .def_property_readonly("M", [](const PackedC& p) { return p.w->params().M; })
      .def_property_readonly("C", [](const PackedC& p) { return p.w->params().C; })
      .def_property_readonly("group", [](const PackedC& p) { return p.w->params().group; });

  m.def("info", &info);
  m.def("estimate_ghz", &estimate_ghz, "Core clock estimate in GHz (dependent add chain; for benchmarks).");
  m.def("peak_probe_names", &onnxopt::peak_probe_names, "Throughput probes this CPU can run.");
  m.def(
      "peak_probe",
      [](const std::string& name, double seconds) {
        py::gil_scoped_release nogil;
        return onnxopt::peak_probe(name, seconds);
      },
      py::arg("name"), py::arg("seconds") = 0.2,
      "Measured throughput ceiling of one core for an instruction mix, GOP/s (a multiply-add is 2 ops).");
  m.def("set_num_threads", [](int n) { g_default_threads = n <= 0 ? static_cast<int>(std::thread::hardware_concurrency()) : n; },
        py::arg("n"));
  m.def("pack_weights", &pack_weights, py::arg("w"), py::arg("w_zp") = py::none(), py::arg("isa") = py::none());
  m.def("qgemm", &qgemm, py::arg("a"), py::arg("a_zp"), py::arg("a_scale"), py::arg("packed"), py::arg("w_scale"),
        py::arg("bias") = py::none(), py::arg("activation") = "none", py::arg("clip_lo") = 0.f,
        py::arg("clip_hi") = 0.f, py::arg("out_scale") = py::none(), py::arg("out_zp") = 0,
        py::arg("threads") = py::none());
  m.def("qgemm_f32", &qgemm_f32, py::arg("x"), py::arg("packed"), py::arg("w_scale"), py::arg("bias") = py::none(),
        py::arg("activation") = "none", py::arg("clip_lo") = 0.f, py::arg("clip_hi") = 0.f,
        py::arg("x_scale") = py::none(), py::arg("x_zp") = 0, py::arg("threads") = py::none());
  m.def("quantize_rows_dynamic", &quantize_rows_dynamic, py::arg("x"), py::arg("isa") = py::none());
  m.def("quantize_static", &quantize_static, py::arg("x"), py::arg("scale"), py::arg("zp"), py::arg("isa") = py::none());
  m.def("pack_conv_weights", &pack_conv_weights, py::arg("w"), py::arg("C"), py::arg("group") = 1,
        py::arg("strides") = std::vector<int>{1, 1}, py::arg("pads") = std::vector<int>{0, 0, 0, 0},
        py::arg("dilations") = std::vector<int>{1, 1}, py::arg("isa") = py::none());
  m.def("qconv2d_f32", &qconv2d_f32, py::arg("x"), py::arg("packed"), py::arg("w_scale"), py::arg("bias") = py::none(),
        py::arg("activation") = "none", py::arg("clip_lo") = 0.f, py::arg("clip_hi") = 0.f,
        py::arg("x_scale") = py::none(), py::arg("x_zp") = 0, py::arg("threads") = py::none(),
        py::arg("residual") = py::none());
  m.def("qconv2d_u8", &qconv2d_u8, py::arg("x"), py::arg("packed"), py::arg("w_scale"), py::arg("bias") = py::none(),
        py::arg("activation") = "none", py::arg("clip_lo") = 0.f, py::arg("clip_hi") = 0.f, py::arg("x_scale"),
        py::arg("x_zp"), py::arg("y_scale"), py::arg("y_zp"), py::arg("threads") = py::none(),
        py::arg("residual") = py::none());
}
