// Throughput ceilings of this core for the instruction mixes the int8 paths use, so benchmarks
// can report a fraction of what the machine at hand can do (a Zen 4 core issues one 512-bit
// vpdpbusd per cycle, an Intel server core two). Each probe runs 12 independent accumulator
// chains (enough to cover latency 5 at two per cycle) of register operands in inline asm: what
// the compiler would make of intrinsics is exactly what is being measured elsewhere. Only called
// after the CPUID check for the ISA the probe needs.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "internal.h"

namespace onnxopt {

namespace {

#define ONNXOPT_X12(op, a, b, p)                                                                       \
  op " " a ", " b ", %%" p "0\n\t" op " " a ", " b ", %%" p "1\n\t" op " " a ", " b ", %%" p "2\n\t"     \
  op " " a ", " b ", %%" p "3\n\t" op " " a ", " b ", %%" p "4\n\t" op " " a ", " b ", %%" p "5\n\t"     \
  op " " a ", " b ", %%" p "6\n\t" op " " a ", " b ", %%" p "7\n\t" op " " a ", " b ", %%" p "8\n\t"     \
  op " " a ", " b ", %%" p "9\n\t" op " " a ", " b ", %%" p "10\n\t" op " " a ", " b ", %%" p "11\n\t"

// One probe: `body` executed `iters` times; ops_per_iter integer/float operations (a MAC = 2).
// The loop is in the asm too, after zeroing the inputs (no denormals, no compiler-placed code).
using Body = void (*)(std::uint64_t iters, const void* mem);

#define ONNXOPT_ZERO_IN                                                                              \
  "vpxor %%xmm12, %%xmm12, %%xmm12\n\tvpxor %%xmm13, %%xmm13, %%xmm13\n\t"                          \
  "vpcmpeqw %%ymm15, %%ymm15, %%ymm15\n\tvpsrlw $15, %%ymm15, %%ymm15\n\t1:\n\t"
#define ONNXOPT_LOOP_END "dec %0\n\tjnz 1b\n\t"
#define ONNXOPT_CLOBBERS                                                                             \
  "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
      "xmm12", "xmm13", "xmm15"

void vnni_zmm(std::uint64_t n, const void* mem) {
  __asm__ volatile(ONNXOPT_ZERO_IN ONNXOPT_X12("vpdpbusd", "%%zmm12", "%%zmm13", "zmm") ONNXOPT_LOOP_END : "+r"(n) : "r"(mem) : ONNXOPT_CLOBBERS);
}

// the s8 operand from memory (a packed-B load folded into the instruction)
void vnni_zmm_mem(std::uint64_t n, const void* mem) {
  __asm__ volatile(ONNXOPT_ZERO_IN ONNXOPT_X12("vpdpbusd", "(%1)", "%%zmm13", "zmm") ONNXOPT_LOOP_END : "+r"(n) : "r"(mem) : ONNXOPT_CLOBBERS);
}

// the u8 operand as a 4-byte memory broadcast ({1to16}: the A element of a GEMM row)
void vnni_zmm_bcst(std::uint64_t n, const void* mem) {
  __asm__ volatile(ONNXOPT_ZERO_IN ONNXOPT_X12("vpdpbusd", "(%1)%{1to16%}", "%%zmm13", "zmm") ONNXOPT_LOOP_END : "+r"(n) : "r"(mem) : ONNXOPT_CLOBBERS);
}

void vnni_ymm(std::uint64_t n, const void* mem) {
  __asm__ volatile(ONNXOPT_ZERO_IN ONNXOPT_X12("vpdpbusd", "%%ymm12", "%%ymm13", "ymm") ONNXOPT_LOOP_END : "+r"(n) : "r"(mem) : ONNXOPT_CLOBBERS);
}

// AVX2 u8 x s8: vpmaddubsw (32 products summed pairwise to s16) + vpmaddwd by ones (to s32) +
// vpaddd, 4 independent chains: 32 MAC per chain step.
void avx2_maddubs(std::uint64_t n, const void* mem) {
  __asm__ volatile(ONNXOPT_ZERO_IN
                   "vpmaddubsw %%ymm12, %%ymm13, %%ymm4\n\tvpmaddubsw %%ymm12, %%ymm13, %%ymm5\n\t"
                   "vpmaddubsw %%ymm12, %%ymm13, %%ymm6\n\tvpmaddubsw %%ymm12, %%ymm13, %%ymm7\n\t"
                   "vpmaddwd %%ymm15, %%ymm4, %%ymm4\n\tvpmaddwd %%ymm15, %%ymm5, %%ymm5\n\t"
                   "vpmaddwd %%ymm15, %%ymm6, %%ymm6\n\tvpmaddwd %%ymm15, %%ymm7, %%ymm7\n\t"
                   "vpaddd %%ymm4, %%ymm0, %%ymm0\n\tvpaddd %%ymm5, %%ymm1, %%ymm1\n\t"
                   "vpaddd %%ymm6, %%ymm2, %%ymm2\n\tvpaddd %%ymm7, %%ymm3, %%ymm3\n\t" ONNXOPT_LOOP_END
                   : "+r"(n) : "r"(mem) : ONNXOPT_CLOBBERS);
}

// AVX2 widened path: s16 x s16 vpmaddwd + vpaddd, 16 MAC per step, 6 chains.
void avx2_maddwd(std::uint64_t n, const void* mem) {
  __asm__ volatile(ONNXOPT_ZERO_IN
                   "vpmaddwd %%ymm12, %%ymm13, %%ymm6\n\tvpmaddwd %%ymm12, %%ymm13, %%ymm7\n\t"
                   "vpmaddwd %%ymm12, %%ymm13, %%ymm8\n\tvpmaddwd %%ymm12, %%ymm13, %%ymm9\n\t"
                   "vpmaddwd %%ymm12, %%ymm13, %%ymm10\n\tvpmaddwd %%ymm12, %%ymm13, %%ymm11\n\t"
                   "vpaddd %%ymm6, %%ymm0, %%ymm0\n\tvpaddd %%ymm7, %%ymm1, %%ymm1\n\tvpaddd %%ymm8, %%ymm2, %%ymm2\n\t"
                   "vpaddd %%ymm9, %%ymm3, %%ymm3\n\tvpaddd %%ymm10, %%ymm4, %%ymm4\n\tvpaddd %%ymm11, %%ymm5, %%ymm5\n\t"
                   ONNXOPT_LOOP_END
                   : "+r"(n) : "r"(mem) : ONNXOPT_CLOBBERS);
}

void fma_zmm(std::uint64_t n, const void* mem) {
  __asm__ volatile(ONNXOPT_ZERO_IN ONNXOPT_X12("vfmadd231ps", "%%zmm12", "%%zmm13", "zmm") ONNXOPT_LOOP_END : "+r"(n) : "r"(mem) : ONNXOPT_CLOBBERS);
}

void fma_ymm(std::uint64_t n, const void* mem) {
  __asm__ volatile(ONNXOPT_ZERO_IN ONNXOPT_X12("vfmadd231ps", "%%ymm12", "%%ymm13", "ymm") ONNXOPT_LOOP_END : "+r"(n) : "r"(mem) : ONNXOPT_CLOBBERS);
}

#undef ONNXOPT_X12
#undef ONNXOPT_ZERO_IN
#undef ONNXOPT_LOOP_END
#undef ONNXOPT_CLOBBERS

struct Probe {
  const char* name;
  Isa needs;
  double ops_per_iter;
  Body body;
};

const Probe kProbes[] = {
    {"vpdpbusd_zmm", Isa::Avx512Vnni, 12 * 64 * 2, vnni_zmm},
    {"vpdpbusd_zmm_mem", Isa::Avx512Vnni, 12 * 64 * 2, vnni_zmm_mem},
    {"vpdpbusd_zmm_bcst", Isa::Avx512Vnni, 12 * 64 * 2, vnni_zmm_bcst},
    {"vpdpbusd_ymm", Isa::Avx512Vnni, 12 * 32 * 2, vnni_ymm},
    {"vpmaddubsw_ymm", Isa::Avx2, 4 * 32 * 2, avx2_maddubs},
    {"vpmaddwd_ymm", Isa::Avx2, 6 * 16 * 2, avx2_maddwd},
    {"fma_zmm", Isa::Avx512Vnni, 12 * 16 * 2, fma_zmm},
    {"fma_ymm", Isa::Avx2, 12 * 8 * 2, fma_ymm},
};

}  // namespace

std::vector<std::string> peak_probe_names() {
  std::vector<std::string> out;
  for (const Probe& p : kProbes)
    if (detail::isa_supported(p.needs)) out.emplace_back(p.name);
  return out;
}

double peak_probe(const std::string& name, double seconds) {
  for (const Probe& p : kProbes) {
    if (name != p.name) continue;
    if (!detail::isa_supported(p.needs)) throw std::invalid_argument("peak_probe: this CPU cannot run " + name);
    alignas(64) static const std::uint8_t mem[64] = {};
    p.body(1000, mem);  // wake the vector unit up (Zen 4 / Intel power up the wide units on demand)
    std::uint64_t iters = 1 << 16;
    double best = 0.0, spent = 0.0;
    while (spent < seconds) {
      const auto t0 = std::chrono::steady_clock::now();
      p.body(iters, mem);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      spent += s;
      best = std::max(best, p.ops_per_iter * static_cast<double>(iters) / s / 1e9);
      if (s < 0.01) iters *= 2;
    }
    return best;  // GOP/s of one core, best of the repetitions (others share the machine)
  }
  throw std::invalid_argument("peak_probe: unknown probe " + name);
}

}  // namespace onnxopt
