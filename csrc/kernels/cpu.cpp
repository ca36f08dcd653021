// CPU feature detection, ISA selection and the serial fallback of Parallel.
#include <atomic>
#include <immintrin.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "internal.h"

namespace onnxopt {

namespace {

std::uint64_t xgetbv0() {
  std::uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<std::uint64_t>(edx) << 32) | eax;
}

// Linux hands out the AMX tile-data state only on request (process wide, inherited by threads).
bool request_amx() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  return (xgetbv0() & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA enabled
#else
  return false;
#endif
}

Isa detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::Scalar;
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
  if (!osxsave || !avx) return Isa::Scalar;
  const std::uint64_t xcr0 = xgetbv0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;             // SSE + AVX state enabled by the OS
  const bool zmm_state = (xcr0 & 0xE6) == 0xE6;           // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!ymm_state || __get_cpuid_max(0, nullptr) < 7) return Isa::Scalar;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1,
             avx512vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
  const bool vnni512 = zmm_state && avx512f && avx512bw && avx512vl && vnni && avx2 && fma;
  const bool amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
  if (vnni512 && amx_tile && amx_int8 && request_amx()) return Isa::Amx;
  if (vnni512) return Isa::Avx512Vnni;
  if (avx2 && fma) return Isa::Avx2;
  return Isa::Scalar;
}

// ONNXOPT_ISA caps the choice; asking for more than the CPU has falls back to what it has
// (info() in Python reports both the request and the result).
Isa from_env(Isa detected) {
  const char* e = std::getenv("ONNXOPT_ISA");
  if (!e || !*e) return detected;
  Isa want;
  if (!std::strcmp(e, "scalar"))
    want = Isa::Scalar;
  else if (!std::strcmp(e, "avx2"))
    want = Isa::Avx2;
  else if (!std::strcmp(e, "avx512vnni"))
    want = Isa::Avx512Vnni;
  else if (!std::strcmp(e, "amx"))
    want = Isa::Amx;
  else
    return detected;
  return static_cast<int>(want) < static_cast<int>(detected) ? want : detected;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  static const Isa isa = from_env(detected_isa());
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512Vnni: return "avx512vnni";
    case Isa::Amx: return "amx";
  }
  return "unknown";
}

namespace {
// Many small indices (a pack task per channel group: 512 for a 2048-channel input) become about
// 4 tasks per thread, each running a contiguous range: a pool task per index costs more than the
// work (ResNet-50's 2048 -> 512 1x1 conv ran slower on 2 threads than on 1).
struct Chunked {
  void (*fn)(void*, std::size_t);
  void* data;
  std::size_t total, chunks;
};

void run_chunk(void* p, std::size_t c) {
  const Chunked& k = *static_cast<const Chunked*>(p);
  const std::size_t b = k.total * c / k.chunks, e = k.total * (c + 1) / k.chunks;
  for (std::size_t i = b; i < e; ++i) k.fn(k.data, i);
}
}  // namespace

void Parallel::operator()(void (*fn)(void*, std::size_t), std::size_t total, void* data) const {
  if (run == nullptr || total <= 1 || degree <= 1) {
    for (std::size_t i = 0; i < total; ++i) fn(data, i);
    return;
  }
  const std::size_t chunks = static_cast<std::size_t>(4) * static_cast<std::size_t>(degree);
  if (total <= chunks) {
    run(ctx, fn, total, data);
    return;
  }
  Chunked k{fn, data, total, chunks};
  run(ctx, run_chunk, chunks, &k);
}

namespace detail {

namespace {
struct AfterState {
  void (*pro)(void*);
  void* pro_data;
  void (*fn)(void*, std::size_t);
  void* data;
  std::size_t total;
  std::atomic<int> claimed{0};
  std::atomic<bool> ready{false};
  std::atomic<std::size_t> next{0};
};

void after_slot(void* p, std::size_t) {
  AfterState& s = *static_cast<AfterState*>(p);
  if (s.claimed.exchange(1, std::memory_order_acq_rel) == 0) {
    s.pro(s.pro_data);
    s.ready.store(true, std::memory_order_release);
  } else {
    // another slot is running the prologue right now (it claimed it): a short, bounded wait
    while (!s.ready.load(std::memory_order_acquire)) _mm_pause();
  }
  for (std::size_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.total;) s.fn(s.data, i);
}
}  // namespace

void run_after(const Parallel& par, void (*pro)(void*), void* pro_data, void (*fn)(void*, std::size_t),
               std::size_t total, void* data) {
  if (par.run == nullptr || par.degree <= 1 || total <= 1) {
    pro(pro_data);
    for (std::size_t i = 0; i < total; ++i) fn(data, i);
    return;
  }
  AfterState s;
  s.pro = pro;
  s.pro_data = pro_data;
  s.fn = fn;
  s.data = data;
  s.total = total;
  par.run(par.ctx, after_slot, static_cast<std::size_t>(par.degree), &s);
}

bool isa_supported(Isa isa) { return static_cast<int>(isa) <= static_cast<int>(detected_isa()); }

const IsaOps& ops_for(Isa isa) {
  if (!isa_supported(isa))
    throw std::invalid_argument(std::string("onnxopt: ISA ") + isa_name(isa) + " is not supported by this CPU (best: " +
                                isa_name(detected_isa()) + ")");
  switch (isa) {
    case Isa::Amx: return ops_amx();
    case Isa::Avx512Vnni: return ops_avx512vnni();
    case Isa::Avx2: return ops_avx2();
    default: return ops_scalar();
  }
}

}  // namespace detail
}  // namespace onnxopt
