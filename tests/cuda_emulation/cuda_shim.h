// Host emulation of the CUDA features torchkiln's attention and paged kernels
// use, so their real source runs (slowly) on a machine without a GPU:
//   * every CUDA thread of a block is a cooperative fiber (ucontext) on one
//     OS thread; barriers yield until every thread (or warp lane) arrived,
//     threads run between barriers in a random order (TK_EMU_SEED), and
//     blocks run one after another;
//   * warp collectives (shuffles, ldmatrix, mma.sync) exchange operands
//     through per-warp slots between two warp barriers and compute what the
//     PTX ISA specifies for each lane's registers;
//   * a cp.async copy lands at once or only at the thread's wait (coin
//     flip); the dynamic shared buffer is one array (blocks run one at a
//     time), NaN bytes when each block starts; static __shared__ arrays are
//     refused.
// What it cannot show: timing, occupancy, launch limits, hardware numerics
// (ex2.approx, tanh.approx) beyond the host's libm.
//
// Include this before any kernel header, with TORCHKILN_EMULATE_CUDA defined.
#pragma once
#ifndef TORCHKILN_EMULATE_CUDA
#error "define TORCHKILN_EMULATE_CUDA before including cuda_shim.h"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // before the macros below: its declarations use the real keywords
#include <vector_types.h>

#include <algorithm>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <memory>
#include <random>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A static __shared__ array would become a function-local static, which the
// optimiser may keep in registers across a fiber switch: kernels run here
// must use dynamic shared memory (TK_DYNAMIC_SMEM, common/cuda/cuda_helpers.cuh).
#define __shared__ static_shared_memory_is_not_emulated_use_TK_DYNAMIC_SMEM
#define __align__(n)  // host loads need no alignment; the buffers are heap-aligned anyway

using std::max;
using std::min;

namespace emu {

inline dim3 thread_idx;  // of the fiber that is running
inline dim3 block_idx, block_dim, grid_dim;
inline std::vector<unsigned char> dynamic_smem(256 * 1024);

// ------------------------------------------------------------ fibers
constexpr size_t kFiberStack = 128 * 1024;  // kernels keep register arrays (fp32 accumulators) on it

// The fibers' schedule: TK_EMU_SEED (default 1) seeds it.
inline std::mt19937& schedule_rng() {
  static std::mt19937 rng([] {
    const char* seed = std::getenv("TK_EMU_SEED");
    return seed != nullptr ? static_cast<unsigned>(std::strtoul(seed, nullptr, 10)) : 1u;
  }());
  return rng;
}

// A cp.async copy issued but not yet landed in shared memory.
struct PendingCopy {
  void* dst;
  unsigned char data[16];
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;  // allocated once, never initialised (untouched pages cost nothing)
  bool done = false;
  std::vector<PendingCopy> in_flight;  // its cp.async copies not yet landed
};
inline ucontext_t scheduler_ctx;
inline std::vector<Fiber> fibers;
inline int current = -1;
inline const std::function<void()>* kernel_body = nullptr;

inline void yield() { swapcontext(&fibers[current].ctx, &scheduler_ctx); }

inline void fiber_entry() {
  (*kernel_body)();
  if (!fibers[current].in_flight.empty()) {
    std::fprintf(stderr, "emulator: thread %d exited with cp.async copies in flight\n", current);
    std::abort();
  }
  fibers[current].done = true;
  swapcontext(&fibers[current].ctx, &scheduler_ctx);
}

// Generation barrier: the last of `count` arrivals releases the others.
struct Barrier {
  int count = 0, arrived = 0;
  unsigned generation = 0;
  void arrive_and_wait() {
    const unsigned g = generation;
    if (++arrived == count) {
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == g) yield();
  }
};

struct Warp {
  Barrier bar{32};
  uint32_t words[32][8];
};
inline Barrier block_barrier;
inline std::vector<Warp> warps;

inline int lane() { return static_cast<int>(thread_idx.x & 31); }
inline Warp& my_warp() { return warps[thread_idx.x >> 5]; }

// Publishes n words of this lane, runs f(all lanes' words) after every lane
// has published, then waits until every lane is done reading.
template <class F>
inline void warp_exchange(const uint32_t* mine, int n, const F& f) {
  Warp& w = my_warp();
  std::memcpy(w.words[lane()], mine, n * sizeof(uint32_t));
  w.bar.arrive_and_wait();
  f(w.words);
  w.bar.arrive_and_wait();
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float half_bits_to_float(uint16_t b, bool bf16) {
  if (bf16) return bits_to_float(static_cast<uint32_t>(b) << 16);
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}

// 8 rows of 8 16-bit elements per matrix; lane L supplies row L % 8 of matrix L / 8.
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
  warp_exchange(&addr, 1, [&](uint32_t (*words)[8]) {
    const int l = lane(), g = l >> 2, t = l & 3;
    for (int m = 0; m < 4; ++m) {
      uint16_t e[2];
      for (int i = 0; i < 2; ++i) {
        // non-trans: (row g, col 2t+i); trans: (row 2t+i, col g)
        const int row = trans ? 2 * t + i : g, col = trans ? g : 2 * t + i;
        std::memcpy(&e[i], dynamic_smem.data() + words[8 * m + row][0] + 2 * col, 2);
      }
      r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
    }
  });
}

// mma.sync.m16n8k16.row.col.f32.{bf16,f16}: fragment layouts as in flash_common.cuh.
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  float A[16][16], B[16][8];
  warp_exchange(mine, 6, [&](uint32_t (*words)[8]) {
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      auto lo = [&](uint32_t w) { return half_bits_to_float(static_cast<uint16_t>(w & 0xFFFF), bf16); };
      auto hi = [&](uint32_t w) { return half_bits_to_float(static_cast<uint16_t>(w >> 16), bf16); };
      A[g][2 * t] = lo(words[l][0]), A[g][2 * t + 1] = hi(words[l][0]);
      A[g + 8][2 * t] = lo(words[l][1]), A[g + 8][2 * t + 1] = hi(words[l][1]);
      A[g][2 * t + 8] = lo(words[l][2]), A[g][2 * t + 9] = hi(words[l][2]);
      A[g + 8][2 * t + 8] = lo(words[l][3]), A[g + 8][2 * t + 9] = hi(words[l][3]);
      B[2 * t][g] = lo(words[l][4]), B[2 * t + 1][g] = hi(words[l][4]);
      B[2 * t + 8][g] = lo(words[l][5]), B[2 * t + 9][g] = hi(words[l][5]);
    }
  });
  const int g = lane() >> 2, t = lane() & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    c[e] += s;
  }
}

// mma.sync.m16n8k32.row.col.s32.s8.s8.s32: fragment layouts as in common/cuda/mma.cuh.
inline void mma_s8_16832(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  int A[16][32], B[32][8];
  warp_exchange(mine, 6, [&](uint32_t (*words)[8]) {
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int i = 0; i < 4; ++i) {
        auto byte = [&](int reg) { return static_cast<int>(static_cast<int8_t>((words[l][reg] >> (8 * i)) & 0xFF)); };
        A[g][4 * t + i] = byte(0);
        A[g + 8][4 * t + i] = byte(1);
        A[g][16 + 4 * t + i] = byte(2);
        A[g + 8][16 + 4 * t + i] = byte(3);
        B[4 * t + i][g] = byte(4);
        B[16 + 4 * t + i][g] = byte(5);
      }
    }
  });
  const int g = lane() >> 2, t = lane() & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    int s = 0;
    for (int k = 0; k < 32; ++k) s += A[row][k] * B[k][col];
    c[e] += s;
  }
}

inline void syncthreads() { block_barrier.arrive_and_wait(); }

// cp.async: a copy lands in shared memory at any time up to the issuing
// thread's wait. Each copy here lands either at once or (coin flip) only at
// that wait, so reading a tile before waiting for it, and issuing a copy into
// a tile others still read, both show as wrong results.
inline void cp_async_16(void* dst, const void* src, int bytes) {
  PendingCopy c{dst, {}};
  if (bytes > 0) std::memcpy(c.data, src, static_cast<size_t>(std::min(bytes, 16)));
  if (schedule_rng()() & 1u) {
    std::memcpy(dst, c.data, 16);
    return;
  }
  fibers[current].in_flight.push_back(c);
}
inline void cp_async_wait_all() {
  for (const PendingCopy& c : fibers[current].in_flight) std::memcpy(c.dst, c.data, 16);
  fibers[current].in_flight.clear();
}

inline float shfl_xor(float v, int mask) {
  float out = 0.0f;
  const uint32_t mine = float_to_bits(v);
  warp_exchange(&mine, 1, [&](uint32_t (*words)[8]) { out = bits_to_float(words[lane() ^ mask][0]); });
  return out;
}

// __any_sync over the full warp.
inline bool any_in_warp(bool v) {
  bool out = false;
  const uint32_t mine = v ? 1u : 0u;
  warp_exchange(&mine, 1, [&](uint32_t (*words)[8]) {
    for (int l = 0; l < 32; ++l) out = out || words[l][0] != 0;
  });
  return out;
}

// Runs body() as every thread of every block of the grid, the blocks one
// after another in a random order (a GPU promises none).
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  grid_dim = grid;
  block_dim = block;
  kernel_body = &body;
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  std::shuffle(blocks.begin(), blocks.end(), schedule_rng());
  for (const dim3& b : blocks) {
    block_idx = b;
    // Shared memory starts as NaN bytes (0xFF: NaN in fp32, bf16 and fp16), so
    // a read of anything this block did not write shows.
    std::memset(dynamic_smem.data(), 0xFF, dynamic_smem.size());
    block_barrier = Barrier{threads};
    warps.assign((threads + 31) / 32, Warp{});
    if (fibers.size() < static_cast<size_t>(threads)) fibers.resize(threads);
    for (int t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      if (!f.stack) f.stack.reset(new char[kFiberStack]);
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kFiberStack;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    // Rounds until every thread returned, each round in a new random
    // order (seeded: runs repeat): a thread then reads what another
    // wrote in the same phase (no barrier between) sometimes before and
    // sometimes after the write, so a missing barrier shows as a wrong
    // result. A thread that returns early never blocks the others (the
    // kernels only do so uniformly per warp).
    std::vector<int> order(threads);
    for (int t = 0; t < threads; ++t) order[t] = t;
    for (int live = threads; live > 0;) {
      live = 0;
      std::shuffle(order.begin(), order.end(), schedule_rng());
      for (const int t : order) {
        if (fibers[t].done) continue;
        current = t;
        thread_idx = dim3(static_cast<unsigned>(t), 0, 0);
        swapcontext(&scheduler_ctx, &fibers[t].ctx);
        live += fibers[t].done ? 0 : 1;
      }
    }
  }
}

// ------------------------------------------------------------ launches
// What cudaGetLastError reports: launch configurations a GPU would refuse.
inline std::string last_error;
inline std::map<const void*, int> max_dynamic_smem;  // from cudaFuncSetAttribute

constexpr size_t kDefaultSmem = 48 * 1024, kMaxSmem = 227 * 1024;  // sm_90 limits per block

template <class Kernel>
struct Launcher {
  dim3 grid, block;
  size_t smem;
  Kernel kernel;
  template <class... Args>
  void operator()(Args&&... args) const {
    const uint64_t threads = uint64_t{block.x} * block.y * block.z;
    const auto opt_in = max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
    const size_t allowed = opt_in == max_dynamic_smem.end() ? kDefaultSmem : static_cast<size_t>(opt_in->second);
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || threads == 0 ||
        threads > 1024)
      last_error = "invalid configuration argument (grid or block size)";
    else if (smem > allowed || allowed > kMaxSmem)
      last_error = "too much dynamic shared memory: " + std::to_string(smem) + " bytes, " + std::to_string(allowed) +
                   " allowed (cudaFuncSetAttribute opt-in missing?)";
    else {
      if (smem > dynamic_smem.size()) dynamic_smem.resize(smem);
      launch(grid, block, [&] { kernel(args...); });
    }
  }
};
template <class Kernel>
Launcher<Kernel> launcher(dim3 grid, dim3 block, size_t smem, Kernel kernel) {
  return {grid, block, smem, kernel};
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu::shfl_xor(v, mask); }
inline bool __any_sync(unsigned, bool v) { return emu::any_in_warp(v); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }  // host division is IEEE round-to-nearest
// nvcc's typed overload (cuda_runtime.h offers it only to CUDA code).
template <class R, class... A>
cudaError_t cudaFuncSetAttribute(R (*kernel)(A...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
inline float __logf(float x) { return std::log(x); }
inline float __uint_as_float(unsigned u) { return emu::bits_to_float(u); }
