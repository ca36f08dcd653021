// Per-thread cache of the kernels' scratch buffers (padded/packed images, A blocks, staging).
//
// A conv allocates up to a few MB of scratch per call. Blocks that large come from mmap in glibc
// (or go back to the OS by heap trimming), so every call paid for zero-filling fresh pages: on
// MobileNet's 32 -> 64 1x1 conv at 112x112 (an 800 KB packed image) the same node took 410 us or
// 660 us depending on what ran around it. Freed blocks are now kept by the freeing thread and
// handed out again by size; the cache is bounded (kMaxBlocks, kMaxBytes per thread) and emptied
// when the thread exits.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>

#include "internal.h"

namespace onnxopt {
namespace detail {
namespace {

constexpr std::size_t kHeader = 64;               // keeps the payload 64-byte aligned
constexpr std::size_t kCacheFrom = 64 * 1024;     // smaller blocks go straight back to the heap
constexpr int kMaxBlocks = 6;
constexpr std::size_t kMaxBytes = 16u << 20;  // per thread

struct Block {
  void* raw;
  std::size_t cap;  // payload bytes
};

std::size_t& cap_of(void* payload) { return *reinterpret_cast<std::size_t*>(static_cast<char*>(payload) - kHeader); }

void release(void* raw) { ::operator delete(raw, std::align_val_t(64)); }

// Set when this thread's cache is destroyed (thread exit; for the main thread before static
// objects, which may still free scratch): from then on blocks go straight back to the heap.
thread_local bool cache_gone = false;

struct Cache {
  Block blocks[kMaxBlocks];
  int n = 0;
  std::size_t bytes = 0;
  ~Cache() {
    for (int i = 0; i < n; ++i) release(blocks[i].raw);
    n = 0;
    bytes = 0;
    cache_gone = true;
  }
  void* take(std::size_t want) {  // the smallest cached block that fits, or null
    int best = -1;
    for (int i = 0; i < n; ++i)
      if (blocks[i].cap >= want && (best < 0 || blocks[i].cap < blocks[best].cap)) best = i;
    if (best < 0) return nullptr;
    void* raw = blocks[best].raw;
    bytes -= blocks[best].cap;
    blocks[best] = blocks[--n];
    return raw;
  }
  void put(void* raw, std::size_t cap) {
    if (cap > kMaxBytes) {
      release(raw);
      return;
    }
    while (n == kMaxBlocks || bytes + cap > kMaxBytes) {  // make room: drop the smallest first
      int small = 0;
      for (int i = 1; i < n; ++i)
        if (blocks[i].cap < blocks[small].cap) small = i;
      bytes -= blocks[small].cap;
      release(blocks[small].raw);
      blocks[small] = blocks[--n];
    }
    blocks[n++] = Block{raw, cap};
    bytes += cap;
  }
};

thread_local Cache cache;

}  // namespace

void* scratch_alloc(std::size_t bytes) {
  if (bytes >= kCacheFrom && !cache_gone) {
    // round up so that blocks of nearby sizes (images of one layer shape) are interchangeable
    bytes = (bytes + 4095) / 4096 * 4096;
    if (void* raw = cache.take(bytes)) return static_cast<char*>(raw) + kHeader;
  }
  void* raw = ::operator new(bytes + kHeader, std::align_val_t(64));
  void* payload = static_cast<char*>(raw) + kHeader;
  cap_of(payload) = bytes;
  return payload;
}

void scratch_free(void* payload) {
  if (!payload) return;
  void* raw = static_cast<char*>(payload) - kHeader;
  const std::size_t cap = cap_of(payload);
  if (cap >= kCacheFrom && !cache_gone)
    cache.put(raw, cap);
  else
    release(raw);
}

}  // namespace detail
}  // namespace onnxopt
