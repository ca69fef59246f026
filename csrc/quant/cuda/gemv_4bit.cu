// 4-bit weights (int4, nf4) times a few rows (1-16) of bf16 / fp16 x, on
// tensor cores, straight from the packed weight: the decode path of a 4-bit
// LLM.
//
// Why a second GEMV next to weight_only_matmul.cu's warp-per-row kernel: on
// an H200 that kernel issues about 7 instructions per weight (unpack, int to
// float, zero, scale, one FMA per row of x) and ncu showed it issue-bound,
// at 0.80x cuBLAS bf16 for one row and 0.43x for 16 (int4; nf4 0.78x at one
// row), where reading 4 bits instead of 16 leaves room for about 3.5x. Here
// a few integer instructions turn two codes into an mma operand, and one
// mma.sync multiplies 256 weights with up to 8 rows of x.
//
// int4 decode: OR-ing a code q (4 bits) into the top four mantissa bits of
// 1.0 gives exactly 1 + q/16, in bf16 and in fp16 (two instructions a pair).
// The tensor cores then sum
//   C = sum (1 + q/16) x = X + (sum q x) / 16,   X = sum of x over the group,
// exactly (the products are exact in the fp32 accumulator), and one group
// adds   scale * (sum q x - zero * X) = 16 s C - (16 + zero) s X   to the
// output, with X summed once per block from the x tile.
// nf4 decode: a byte's two codes index a 256-entry shared table of value
// pairs (the codebook rounded to x's dtype, as the GEMM path rounds its
// weights): three instructions a pair; a group adds absmax * C.
//
// The k order: mma sums its 16 k slots in any order as long as A and B agree.
// For each 64-column chunk of a packed row (32 bytes: byte j holds column j
// in its low nibble and 32 + j in its high one), lane (g, t) of a warp loads
// bytes 8t..8t+7 of rows g and g + 8 (one 8-byte load each; a warp reads 16
// whole 32-byte sectors). A chunk is four mma steps, s = 2h + s1:
//   int4: step s takes the low (h = 0) or high (h = 1) nibbles of word s1 of
//     those bytes: slots 2t, 2t+1 get bytes 0 and 2 of the word, slots
//     2t+8, 2t+9 bytes 1 and 3. A step covers 16 columns of one 32-column
//     half, so a group (a multiple of 32 columns) is whole steps.
//   nf4: step s takes bytes 2s (slots 2t, 2t+1) and 2s+1 (slots 2t+8, 2t+9),
//     each byte its two codes (columns j and 32 + j), so a step spans both
//     halves of the chunk, and the group must be a multiple of 64 columns
//     (the usual nf4 block is 64).
// x is staged in shared memory in the matching order, one 16-byte read per
// lane and two steps.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common/cuda/cuda_helpers.cuh"
#include "common/cuda/mma.cuh"
#include "quant/cuda/split_sum.cuh"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerBlock = 16 * kWarps;  // each warp an m16 tile of output features
constexpr int kChunk = 64;                  // columns per 32-byte chunk of a packed row
constexpr int kBatch = 4;                   // chunks per lane loaded ahead of the ones being multiplied
constexpr int kMaxRows = 16;                // rows of x: up to two n8 tiles
// Shared memory per split column and n8 tile: 16 bytes of staged x, 1 of run
// sums and at most 1 of group sums. The cap keeps a block within the 48 KB a
// launch gets without opting in, and about 6 blocks on an SM.
constexpr int64_t kMaxSplitColsTimesTiles = 2048;
// Blocks wanted per SM: each warp keeps kBatch * 512 bytes of weight in
// flight, and about 24 warps (~48 KB) per SM cover the H200's memory latency.
// (A first guess from Little's law; not yet tuned on a GPU.)
constexpr int kBlocksPerSm = 6;

// (a & mask) | one as a single LOP3. Written plainly, nvcc emits two: a
// LOP3 takes one immediate operand, and it keeps both constants immediate.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t one) {
#ifdef TORCHKILN_EMULATE_CUDA
  return (a & mask) | one;
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(one));
  return d;
#endif
}

// (1 + q/16) pairs from a word of packed bytes b0..b3: `even` holds the codes
// of b0 and b2 (low nibbles for h = 0, high for h = 1), `odd` those of b1, b3.
// `one` is kOne, passed in a register.
template <class T>
struct Int4Decode;
template <>
struct Int4Decode<__nv_bfloat16> {  // 7 mantissa bits: q lands in bits 3-6
  static constexpr uint32_t kOne = 0x3F803F80u, kMask = 0x00780078u;
  __device__ static __forceinline__ uint32_t even(uint32_t w, int h, uint32_t one) {
    return and_or(h ? w >> 1 : w << 3, kMask, one);
  }
  __device__ static __forceinline__ uint32_t odd(uint32_t w, int h, uint32_t one) {
    return and_or(h ? w >> 9 : w >> 5, kMask, one);
  }
};
template <>
struct Int4Decode<__half> {  // 10 mantissa bits: q lands in bits 6-9
  static constexpr uint32_t kOne = 0x3C003C00u, kMask = 0x03C003C0u;
  __device__ static __forceinline__ uint32_t even(uint32_t w, int h, uint32_t one) {
    return and_or(h ? w << 2 : w << 6, kMask, one);
  }
  __device__ static __forceinline__ uint32_t odd(uint32_t w, int h, uint32_t one) {
    return and_or(h ? w >> 6 : w >> 2, kMask, one);
  }
};

// The NF4 codebook (quant_matmul.h) in constant memory, for the table below.
__constant__ float kNf4Values[16] = {
    kNf4Codebook[0], kNf4Codebook[1], kNf4Codebook[2],  kNf4Codebook[3],  kNf4Codebook[4],  kNf4Codebook[5],
    kNf4Codebook[6], kNf4Codebook[7], kNf4Codebook[8],  kNf4Codebook[9],  kNf4Codebook[10], kNf4Codebook[11],
    kNf4Codebook[12], kNf4Codebook[13], kNf4Codebook[14], kNf4Codebook[15],
};
constexpr int kNf4PairEntries = 256;  // one per byte: its low code's value, then its high code's

// Byte i (0-3) of w, as a table index.
__device__ __forceinline__ uint32_t byte_of(uint32_t w, int i) {
#ifdef TORCHKILN_EMULATE_CUDA
  return (w >> (8 * i)) & 0xFFu;
#else
  uint32_t d;  // one PRMT: byte i into byte 0, zeros above
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(d) : "r"(w), "r"(0x4440u | static_cast<uint32_t>(i)));
  return d;
#endif
}

// Shared memory of a block whose split spans `cols` columns (a multiple of
// 32): staged x, then int4's run and group sums of x, or nf4's pair table.
struct SmemLayout {
  int chunks, runs, groups;   // 64-column chunks, 32-column runs, groups
  int64_t x_units, bytes;     // 16-byte units of staged x; total bytes
  __host__ __device__ SmemLayout(int64_t cols, int64_t group_size, int tiles, bool nf4) {
    chunks = static_cast<int>((cols + kChunk - 1) / kChunk);
    runs = static_cast<int>(cols / 32);
    groups = static_cast<int>(cols / group_size);
    x_units = static_cast<int64_t>(chunks) * tiles * 64;
    bytes = x_units * 16 + (nf4 ? kNf4PairEntries * 4 : static_cast<int64_t>(runs + groups) * 8 * tiles * 4);
  }
};

// Grid (ceil(n / 64), splits); block y covers columns [y * split_cols,
// min(k, (y + 1) * split_cols)), which start and end on group boundaries.
// One split writes out (+ bias); several write fp32 partials,
// workspace[y][m][n], for split_sum_kernel.
template <class T, int kTiles, bool kNf4>
__global__ void __launch_bounds__(kThreads)
    gemv_4bit_kernel(const WeightOnlyParams p, int64_t split_cols, bool vec_x, float* workspace) {
  using Mma = cuda::MmaType<T>;
  using Dec = Int4Decode<T>;
  constexpr int kXRows = 8 * kTiles;
  TK_DYNAMIC_SMEM(smem);
  const int64_t k_begin = blockIdx.y * split_cols, k_end = min(p.k, k_begin + split_cols);
  const SmemLayout lay(k_end - k_begin, p.group_size, kTiles, kNf4);
  uint4* xs = reinterpret_cast<uint4*>(smem);                    // [chunk][tile][half][lane]
  float* run_sums = reinterpret_cast<float*>(xs + lay.x_units);  // int4: [run][x row]
  float* group_sums = run_sums + lay.runs * kXRows;              // int4: [group][x row]
  uint32_t* pairs = reinterpret_cast<uint32_t*>(xs + lay.x_units);  // nf4: [byte]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t warp_row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp * 16;
  const int64_t row0 = warp_row + g, row1 = row0 + 8;
  // Rows past n read row n - 1 (valid memory; their sums are never stored).
  const int64_t r0 = min(row0, p.n - 1), r1 = min(row1, p.n - 1);
  const uint8_t* w0 = p.qweight + r0 * p.qweight_row_stride + (k_begin / kChunk) * 32 + 8 * t;
  const uint8_t* w1 = p.qweight + r1 * p.qweight_row_stride + (k_begin / kChunk) * 32 + 8 * t;
  uint2 cur[kBatch][2] = {}, nxt[kBatch][2] = {};
  const auto load_batch = [&](int c0, uint2 (&buf)[kBatch][2]) {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (c0 + i < lay.chunks) {
        buf[i][0] = *reinterpret_cast<const uint2*>(w0 + (c0 + i) * 32);
        buf[i][1] = *reinterpret_cast<const uint2*>(w1 + (c0 + i) * 32);
      }
    }
  };
  load_batch(0, cur);  // in flight while x is staged

  // Stage x: unit u = ((c * kTiles + j) * 2 + h) * 32 + l holds, for lane
  // l = 4 g' + t', x row 8j + g' in the order of steps 2h and 2h + 1's b0,
  // b1 (rows past m and columns past k are 0), columns of chunk c:
  //   int4: 32h + 8t' + (0,2 | 1,3 | 4,6 | 5,7); a run's four units sit in
  //     four neighbouring lanes, which add up the run's sum of x;
  //   nf4: 8t' + 4h + i and 32 + 8t' + 4h + i, i = 0..3, interleaved.
  const T* x = static_cast<const T*>(p.x);
  for (int64_t u = threadIdx.x; u < lay.x_units; u += kThreads) {  // x_units is a multiple of 64: whole warps
    const int l = static_cast<int>(u & 31), h = static_cast<int>((u >> 5) & 1);
    const int j = static_cast<int>((u >> 6) % kTiles), c = static_cast<int>((u >> 6) / kTiles);
    const int64_t xrow = 8 * j + (l >> 2);
    const int64_t chunk_col = k_begin + c * kChunk;
    T e[8];  // in staged order
    const auto fetch = [&](int64_t col, int n, T* dst, int stride) {  // n elements from col, or zeros
      const bool in = xrow < p.m && col < k_end;
      const T* src = x + xrow * p.x_row_stride + col;
      if (in && vec_x && n == 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(src);
        T v[8];
        memcpy(v, &raw, sizeof(v));
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[i * stride] = v[i];
      } else if (in && vec_x) {
        const uint2 raw = *reinterpret_cast<const uint2*>(src);
        T v[4];
        memcpy(v, &raw, sizeof(v));
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i * stride] = v[i];
      } else {
        for (int i = 0; i < n; ++i) dst[i * stride] = in ? src[i] : cuda::from_float<T>(0.0f);
      }
    };
    if constexpr (kNf4) {
      fetch(chunk_col + 8 * (l & 3) + 4 * h, 4, e, 2);
      fetch(chunk_col + 32 + 8 * (l & 3) + 4 * h, 4, e + 1, 2);
    } else {
      T v[8];
      fetch(chunk_col + 32 * h + 8 * (l & 3), 8, v, 1);
      const T ordered[8] = {v[0], v[2], v[1], v[3], v[4], v[6], v[5], v[7]};
      memcpy(e, ordered, sizeof(e));
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += cuda::to_float(v[i]);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if ((l & 3) == 0 && 2 * c + h < lay.runs) run_sums[(2 * c + h) * kXRows + 8 * j + (l >> 2)] = sum;
    }
    uint4 v;
    memcpy(&v, e, sizeof(v));
    xs[u] = v;
  }
  if constexpr (kNf4) {
    for (int b = threadIdx.x; b < kNf4PairEntries; b += kThreads)
      pairs[b] = Mma::pack(kNf4Values[b & 15], kNf4Values[b >> 4]);
  }
  __syncthreads();
  const int runs_per_group = static_cast<int>(p.group_size / 32);
  if constexpr (!kNf4) {
    for (int i = threadIdx.x; i < lay.groups * kXRows; i += kThreads) {
      const int grp = i / kXRows, xrow = i % kXRows;
      float s = 0.0f;
      for (int r = 0; r < runs_per_group; ++r) s += run_sums[(grp * runs_per_group + r) * kXRows + xrow];
      group_sums[i] = s;
    }
    __syncthreads();
  }
  if (warp_row >= p.n) return;  // after the block's last barrier

  // Scale (and int4's zero) of rows r0, r1 for the current group, loaded a
  // group ahead.
  const int64_t groups_per_row = p.k / p.group_size, group0 = k_begin / p.group_size;
  const float* s0 = p.scales + r0 * groups_per_row + group0;
  const float* s1 = p.scales + r1 * groups_per_row + group0;
  const uint8_t* z0 = kNf4 ? nullptr : p.zeros + r0 * groups_per_row + group0;
  const uint8_t* z1 = kNf4 ? nullptr : p.zeros + r1 * groups_per_row + group0;
  float sz[4] = {s0[0], kNf4 ? 0.0f : static_cast<float>(z0[0]), s1[0], kNf4 ? 0.0f : static_cast<float>(z1[0])};

  float acc[kTiles][4], c_acc[kTiles][4];
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = c_acc[j][e] = 0.0f;
  int grp = 0, run_in_group = 0;
  const float* xsum_at = group_sums + 2 * t;  // int4: this lane's x rows (2t, 2t + 1) of group grp
  // Adds group grp's share to acc and starts the next group: int4
  // 16 s C - (16 + z) s X (two FMAs an element: the terms cancel to about a
  // tenth, far above fp32's rounding), nf4 absmax C.
  const auto finish_group = [&]() {
    if constexpr (kNf4) {
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        acc[j][0] = fmaf(sz[0], c_acc[j][0], acc[j][0]);
        acc[j][1] = fmaf(sz[0], c_acc[j][1], acc[j][1]);
        acc[j][2] = fmaf(sz[2], c_acc[j][2], acc[j][2]);
        acc[j][3] = fmaf(sz[2], c_acc[j][3], acc[j][3]);
        c_acc[j][0] = c_acc[j][1] = c_acc[j][2] = c_acc[j][3] = 0.0f;
      }
      if (++grp < lay.groups) sz[0] = s0[grp], sz[2] = s1[grp];
    } else {
      const float a0 = 16.0f * sz[0], b0 = -(16.0f + sz[1]) * sz[0];
      const float a1 = 16.0f * sz[2], b1 = -(16.0f + sz[3]) * sz[2];
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        const float2 xsum = *reinterpret_cast<const float2*>(xsum_at + 8 * j);
        acc[j][0] = fmaf(b0, xsum.x, fmaf(a0, c_acc[j][0], acc[j][0]));
        acc[j][1] = fmaf(b0, xsum.y, fmaf(a0, c_acc[j][1], acc[j][1]));
        acc[j][2] = fmaf(b1, xsum.x, fmaf(a1, c_acc[j][2], acc[j][2]));
        acc[j][3] = fmaf(b1, xsum.y, fmaf(a1, c_acc[j][3], acc[j][3]));
        c_acc[j][0] = c_acc[j][1] = c_acc[j][2] = c_acc[j][3] = 0.0f;
      }
      xsum_at += kXRows;
      if (++grp < lay.groups) sz[0] = s0[grp], sz[1] = z0[grp], sz[2] = s1[grp], sz[3] = z1[grp];
    }
  };

  // Multiplies chunks [c0, c0 + kBatch) held in buf.
  const uint32_t one = Dec::kOne;
  const auto multiply_batch = [&](int c0, const uint2 (&buf)[kBatch][2]) {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int c = c0 + i;
      if (c >= lay.chunks) break;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (2 * c + h >= lay.runs) break;  // int4: the padding half of a row's last chunk
        uint4 xb[kTiles];
#pragma unroll
        for (int j = 0; j < kTiles; ++j) xb[j] = xs[((c * kTiles + j) * 2 + h) * 32 + lane];
#pragma unroll
        for (int s1 = 0; s1 < 2; ++s1) {
          uint32_t a[4];
          if constexpr (kNf4) {  // bytes 4h + 2 s1 and + 1: word h, bytes 2 s1, 2 s1 + 1
            const uint32_t wa = h ? buf[i][0].y : buf[i][0].x, wb = h ? buf[i][1].y : buf[i][1].x;
            a[0] = pairs[byte_of(wa, 2 * s1)];
            a[1] = pairs[byte_of(wb, 2 * s1)];
            a[2] = pairs[byte_of(wa, 2 * s1 + 1)];
            a[3] = pairs[byte_of(wb, 2 * s1 + 1)];
          } else {
            const uint32_t wa = s1 ? buf[i][0].y : buf[i][0].x, wb = s1 ? buf[i][1].y : buf[i][1].x;
            a[0] = Dec::even(wa, h, one);
            a[1] = Dec::even(wb, h, one);
            a[2] = Dec::odd(wa, h, one);
            a[3] = Dec::odd(wb, h, one);
          }
#pragma unroll
          for (int j = 0; j < kTiles; ++j) Mma::mma(c_acc[j], a, s1 ? xb[j].z : xb[j].x, s1 ? xb[j].w : xb[j].y);
        }
        if (++run_in_group == runs_per_group) {
          finish_group();
          run_in_group = 0;
        }
      }
    }
  };
  // Two buffers taking turns (no register copies): one batch is multiplied
  // while the next is loading.
  for (int c0 = 0; c0 < lay.chunks; c0 += 2 * kBatch) {
    load_batch(c0 + kBatch, nxt);
    multiply_batch(c0, cur);
    load_batch(c0 + 2 * kBatch, cur);
    multiply_batch(c0 + kBatch, nxt);
  }

  // acc[j][e]: output feature e < 2 ? row0 : row1, x row 8j + 2t + (e & 1).
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t xrow = 8 * j + 2 * t + (e & 1), col = e < 2 ? row0 : row1;
      if (xrow >= p.m || col >= p.n) continue;
      if (workspace)
        workspace[(blockIdx.y * p.m + xrow) * p.n + col] = acc[j][e];
      else
        out[xrow * p.out_row_stride + col] = cuda::from_float<T>(acc[j][e] + (bias ? cuda::to_float(bias[col]) : 0.0f));
    }
}

struct Plan {
  int tiles = 0;
  int64_t split_cols = 0, splits = 0;  // splits 0: the weight or x do not suit this kernel
  size_t smem = 0;
};

Plan make_plan(const WeightOnlyParams& p) {
  Plan plan;
  // nf4's steps span both halves of a chunk: its groups are whole chunks.
  const int64_t group_multiple = p.format == WeightFormat::kNf4 ? kChunk : 32;
  if (p.format == WeightFormat::kInt8 || p.dtype == DType::kFloat32 || p.m < 1 || p.m > kMaxRows || p.n < 1 ||
      p.k < 1 || p.k >= (int64_t{1} << 31) || p.group_size % group_multiple != 0 || p.k % p.group_size != 0)
    return plan;
  // 8-byte weight loads: every row must start 8-byte aligned.
  if (reinterpret_cast<uintptr_t>(p.qweight) % 8 != 0 || p.qweight_row_stride % 8 != 0) return plan;
  plan.tiles = p.m > 8 ? 2 : 1;
  // A split starts on a chunk and on a group: a multiple of both.
  const int64_t unit = p.group_size % kChunk == 0 ? p.group_size : 2 * p.group_size;
  const int64_t max_units = kMaxSplitColsTimesTiles / plan.tiles / unit;
  if (max_units < 1) return plan;  // groups too long to stage (e.g. one group a row)
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t total_units = cuda::ceil_div(p.k, unit), row_tiles = cuda::ceil_div(p.n, kRowsPerBlock);
  const int64_t want_splits = cuda::ceil_div(int64_t{kBlocksPerSm} * std::max(sms, 1), row_tiles);
  // At least 256 columns a split (4 chunks a warp) where k has them, so
  // staging x stays a small part of a block's work.
  const int64_t min_units = std::min(max_units, std::max<int64_t>(1, 256 / unit));
  const int64_t per_split = std::clamp(cuda::ceil_div(total_units, want_splits), min_units, max_units);
  plan.splits = cuda::ceil_div(total_units, per_split);
  if (plan.splits > 65535) return Plan{};
  plan.split_cols = per_split * unit;
  plan.smem = static_cast<size_t>(
      SmemLayout(plan.split_cols, p.group_size, plan.tiles, p.format == WeightFormat::kNf4).bytes);
  return plan;
}

}  // namespace

int64_t gemv_4bit_cuda_splits(const WeightOnlyParams& p) { return make_plan(p).splits; }

void gemv_4bit_cuda(const WeightOnlyParams& p, int64_t splits, float* workspace, CUstream_st* stream) {
  const Plan plan = make_plan(p);
  if (plan.splits == 0)
    throw std::invalid_argument("gemv_4bit_cuda: int4 / nf4 weights and 1-16 rows of bf16 / fp16 x only");
  if (splits != plan.splits) throw std::invalid_argument("gemv_4bit_cuda: splits must be gemv_4bit_cuda_splits(p)");
  if (splits > 1 && workspace == nullptr)
    throw std::invalid_argument("gemv_4bit_cuda: splits > 1 need a workspace of splits x m x n floats");
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(p.n, kRowsPerBlock)), static_cast<unsigned>(plan.splits));
  float* ws = plan.splits > 1 ? workspace : nullptr;
  const bool nf4 = p.format == WeightFormat::kNf4;
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      const bool vec_x = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
                         ((p.m > 1 ? p.x_row_stride : 0) * sizeof(T)) % 16 == 0;
      const auto launch = [&](auto kernel) {
        TK_KERNEL_LAUNCH(grid, kThreads, plan.smem, stream, kernel)(p, plan.split_cols, vec_x, ws);
      };
      if (plan.tiles == 1)
        nf4 ? launch(gemv_4bit_kernel<T, 1, true>) : launch(gemv_4bit_kernel<T, 1, false>);
      else
        nf4 ? launch(gemv_4bit_kernel<T, 2, true>) : launch(gemv_4bit_kernel<T, 2, false>);
      cuda::check_launch("gemv_4bit");
      if (ws != nullptr) quant_cuda::launch_split_sum<T>(p, static_cast<int>(plan.splits), ws, stream);
    }
  });
}

}  // namespace torchkiln
