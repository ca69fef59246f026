// Weight-only quantised matmul on CUDA.
//  * Up to kMaxRows rows of x (decode): a warp per output row decodes the
//    packed weight in registers (16-byte loads, 512 contiguous bytes per
//    warp step) and multiplies it with every row of x.
//  * More rows, bf16 / fp16 x (prefill): a tensor-core GEMM. Each block
//    decodes a 64 x 64 weight tile into shared memory as x's dtype (exactly
//    the dequantised values) and multiplies it with a 64 x 64 tile of x by
//    mma.sync; the dense weight never exists in global memory.
//  * fp32 x with many rows: dequantise + cuBLAS in the glue.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "common/cuda/cuda_helpers.cuh"
#include "common/cuda/mma.cuh"
#include "quant/cuda/split_sum.cuh"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace {

using cuda::from_float;
using cuda::to_float;
using cuda::warp_sum;

constexpr int kWarps = 4;  // output rows per block
constexpr int kMaxRows = 8;

// ------------------------------------------------------------ packed rows
// Every kernel here reads a weight row as 16-byte packets. A 4-bit packet is
// two runs of 16 columns (its low nibbles and its high nibbles, see
// kNibbleChunk), an int8 packet one run; a run lies in one group, so its
// scale (and zero) is read once, and each code then costs a few ALU
// operations: no division, no int-to-float conversion.
constexpr int kRun = 16;  // columns per run

struct Packet {
  uint32_t w[4];
};

// Byte by byte (a row not 16-byte aligned, an int8 row's short last packet).
// Unrolled, so the packet stays in registers (a loop indexing it would put
// it, and the fast path's packet with it, on the stack).
__device__ __forceinline__ Packet load_packet_narrow(const uint8_t* at, int valid_bytes) {
  Packet pk{};
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (i < valid_bytes) pk.w[i / 4] |= static_cast<uint32_t>(at[i]) << (8 * (i % 4));
  return pk;
}

__device__ __forceinline__ uint32_t packet_byte(const Packet& pk, int i) { return (pk.w[i / 4] >> (8 * (i % 4))) & 0xFFu; }

// A code in [0, 255] as a float without an int-to-float conversion (a
// quarter-rate instruction): in the low mantissa bits of 2^23 it reads as
// 2^23 + code exactly.
__device__ __forceinline__ float small_code_to_float(uint32_t code) {
  return __uint_as_float(0x4B000000u | code) - 8388608.0f;
}

// The NF4 code values, copied into shared memory by each kernel: lookups
// there are conflict-free (16 words, 16 banks), unlike divergent reads of
// __constant__ memory.
__constant__ float kNf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f,
};
constexpr size_t kNf4TableBytes = 16 * sizeof(float);

// Fills `table` (shared) and syncs the block: call before any early return.
__device__ __forceinline__ void load_nf4_table(float* table) {
  if (threadIdx.x < 16) table[threadIdx.x] = kNf4[threadIdx.x];
  __syncthreads();
}

// 16-byte loads need every row to start 16-byte aligned.
inline bool rows_aligned(const void* base, int64_t row_stride_bytes) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && row_stride_bytes % 16 == 0;
}

// One weight row: its packets, their runs, and the runs' decoded weights.
struct WeightRow {
  const uint8_t* bytes;
  const float* scales;
  const uint8_t* zeros;  // kInt4 only
  const float* nf4_table;
  int64_t row_bytes;  // holding codes: the row stride for 4-bit formats, k for int8
  int64_t k;
  uint32_t group_size;
  WeightFormat format;
  bool four_bit, vec;

  __device__ WeightRow(const WeightOnlyParams& p, int64_t row, bool vec_loads, const float* table)
      : nf4_table(table), k(p.k), group_size(static_cast<uint32_t>(p.group_size)), format(p.format),
        vec(vec_loads) {
    const int64_t groups = p.k / p.group_size;
    four_bit = p.format != WeightFormat::kInt8;
    row_bytes = four_bit ? p.qweight_row_stride : p.k;
    bytes = p.qweight + row * p.qweight_row_stride;
    scales = p.scales + row * groups;
    zeros = p.zeros ? p.zeros + row * groups : nullptr;
  }

  __device__ int64_t packets() const { return (row_bytes + 15) / 16; }
  __device__ int runs_per_packet() const { return four_bit ? 2 : 1; }
  // First column of run `run` of packet q. k is a multiple of 32 for 4-bit
  // formats, so a 4-bit run is all inside the row or all padding.
  __device__ int64_t run_column(int64_t q, int run) const {
    return four_bit ? (q / 2) * kNibbleChunk + (q % 2) * kRun + run * (kNibbleChunk / 2) : q * kRun;
  }

  __device__ Packet load(int64_t q) const {
    const int64_t left = row_bytes - q * 16;
    if (!vec || left < 16) return load_packet_narrow(bytes + q * 16, static_cast<int>(left < 16 ? left : 16));
    const uint4 v = *reinterpret_cast<const uint4*>(bytes + q * 16);
    return Packet{{v.x, v.y, v.z, v.w}};
  }

  // The 16 weights of run `run` of packet q (run_column < k), as the CPU
  // reference computes them: (q - zero) * scale, code * scale (nf4),
  // q * scale (int8). Columns of an int8 run past k decode to 0.
  __device__ void decode(const Packet& pk, int64_t q, int run, float (&w)[kRun]) const {
    const int64_t c = run_column(q, run);
    const uint32_t g = four_bit ? static_cast<uint32_t>(c) / group_size : 0;
    const float scale = scales[g];
    const int shift = 4 * run;
    switch (format) {
      case WeightFormat::kInt4: {
        const float zero = static_cast<float>(zeros[g]);
#pragma unroll
        for (int i = 0; i < kRun; ++i) w[i] = (small_code_to_float((packet_byte(pk, i) >> shift) & 15u) - zero) * scale;
        break;
      }
      case WeightFormat::kNf4:
#pragma unroll
        for (int i = 0; i < kRun; ++i) w[i] = nf4_table[(packet_byte(pk, i) >> shift) & 15u] * scale;
        break;
      default:  // int8: flipping the sign bit maps [-128, 127] onto [0, 255]
#pragma unroll
        for (int i = 0; i < kRun; ++i) w[i] = (small_code_to_float(packet_byte(pk, i) ^ 0x80u) - 128.0f) * scale;
        break;
    }
  }
};

// ------------------------------------------------------------ decode GEMV
// A warp per output row: the warp reads 512 contiguous bytes per step, each
// lane two packets at a time so that two loads are in flight before the
// first is decoded, and each decoded weight costs one FMA per row of x.
// Rows or x not 16-byte aligned (int8 with k % 16 != 0, a sliced x) take the
// same path with narrow loads.

// Columns [c0, c0 + 16) of row `row` of x as fp32; columns past k read 0.
template <class T>
__device__ __forceinline__ void load_x_run(const WeightOnlyParams& p, int64_t row, int64_t c0, bool vec,
                                           float (&xv)[kRun]) {
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride + c0;
  if (vec && c0 + kRun <= p.k) {
    uint4 raw[kRun * sizeof(T) / 16];
#pragma unroll
    for (int i = 0; i < kRun * static_cast<int>(sizeof(T)) / 16; ++i) raw[i] = reinterpret_cast<const uint4*>(x)[i];
    T e[kRun];
    memcpy(e, raw, sizeof(e));  // not a pointer cast: reading uint4s as T breaks type-based alias analysis
#pragma unroll
    for (int i = 0; i < kRun; ++i) xv[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kRun; ++i) xv[i] = c0 + i < p.k ? to_float(x[i]) : 0.0f;
  }
}

template <class T, int M>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(WeightOnlyParams p, bool vec_weight, bool vec_x) {
  TK_DYNAMIC_SMEM(smem);
  float* nf4_table = reinterpret_cast<float*>(smem);
  load_nf4_table(nf4_table);
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.n) return;
  const WeightRow wr(p, row, vec_weight, nf4_table);

  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  const auto multiply = [&](int64_t q, const Packet& pk) {
    for (int run = 0; run < wr.runs_per_packet(); ++run) {
      const int64_t c = wr.run_column(q, run);
      if (c >= p.k) break;
      float w[kRun];
      wr.decode(pk, q, run, w);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (m >= p.m) break;
        float xv[kRun];
        load_x_run<T>(p, m, c, vec_x, xv);
#pragma unroll
        for (int i = 0; i < kRun; ++i) acc[m] = fmaf(w[i], xv[i], acc[m]);
      }
    }
  };
  const int64_t packets = wr.packets();
  for (int64_t q = lane; q < packets; q += 64) {
    const bool second = q + 32 < packets;
    const Packet a = wr.load(q);
    const Packet b = second ? wr.load(q + 32) : Packet{};
    multiply(q, a);
    if (second) multiply(q + 32, b);
  }

  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0 && m < p.m) out[m * p.out_row_stride + row] = from_float<T>(v + (bias ? to_float(bias[row]) : 0.0f));
  }
}

// ------------------------------------------------------------ dequantisation
// A thread per packet; exactly the CPU's values (the same operations on the
// same fp32 inputs, rounded once to T).
template <class T>
__global__ void dequantize_kernel(WeightOnlyParams p, bool vec, T* dense) {
  TK_DYNAMIC_SMEM(smem);
  float* nf4_table = reinterpret_cast<float*>(smem);
  load_nf4_table(nf4_table);
  const int64_t packets = WeightRow(p, 0, vec, nf4_table).packets(), total = p.n * packets;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / packets, q = i % packets;
    const WeightRow wr(p, row, vec, nf4_table);
    const Packet pk = wr.load(q);
    for (int run = 0; run < wr.runs_per_packet(); ++run) {
      const int64_t c = wr.run_column(q, run);
      if (c >= p.k) break;
      float w[kRun];
      wr.decode(pk, q, run, w);
      T* dst = dense + row * p.k + c;
#pragma unroll
      for (int j = 0; j < kRun; ++j)
        if (c + j < p.k) dst[j] = from_float<T>(w[j]);
    }
  }
}

// ------------------------------------------------------------ tensor-core GEMM
// Each block multiplies a 64 x 64 tile of x with a 64 x 64 tile of the
// decoded weight per step of k, by mma.sync from shared memory. The next
// step's weight packets and x tile are loaded into registers before the
// current step's products, so global loads overlap the tensor cores; and
// when the (m, n) tiles alone are too few to keep every SM streaming (few
// rows of x), k is split over blocks, which write fp32 partial sums that a
// second kernel adds in a fixed order (deterministic), with the bias.
constexpr int kGemmTile = 64;             // rows of x, output features and columns of k per block step
constexpr int kGemmLd = kGemmTile + 8;    // padded shared rows: conflict-free ldmatrix
constexpr int kGemmThreads = 128;         // 4 warps, each a 32 x 32 block of the output tile
constexpr size_t kGemmTileBytes = 2 * kGemmTile * kGemmLd * sizeof(uint16_t);  // sX and sW
constexpr size_t kGemmSmemBytes = kGemmTileBytes + kNf4TableBytes;
constexpr int kXChunks = kGemmTile * kGemmTile / 8 / kGemmThreads;  // 8-element chunks of the x tile per thread

// This thread's share of one k step, held in registers between its load and
// its store to shared memory.
struct GemmStage {
  Packet w[2];       // the weight packets (one for 4-bit rows, two for int8)
  uint4 x[kXChunks];  // 8 elements each of the x tile
};

// Thread t owns weight row t / 2 of the tile and half t % 2 of its bytes
// for a step: one packet (two runs) of a 4-bit row, two packets (a run
// each) of an int8 row; and x chunks t + 128 i (row / 8, 8 columns each).
__device__ __forceinline__ int64_t tile_packet(const WeightRow& wr, int64_t k0, int j) {
  const int half = threadIdx.x & 1;
  return wr.four_bit ? k0 / 32 + half : k0 / 16 + 2 * half + j;
}

template <class T>
__device__ __forceinline__ void load_stage(const WeightOnlyParams& p, const WeightRow& wr, bool in_rows, bool vec_x,
                                           int64_t m0, int64_t k0, GemmStage& st) {
#pragma unroll
  for (int j = 0; j < 2; ++j)
    st.w[j] = in_rows && (j == 0 || !wr.four_bit) ? wr.load(tile_packet(wr, k0, j)) : Packet{};  // nothing past the row
  const T* x = static_cast<const T*>(p.x);
#pragma unroll
  for (int i = 0; i < kXChunks; ++i) {
    const int u = threadIdx.x + kGemmThreads * i, r = u / 8;
    const int64_t row = m0 + r, col = k0 + (u % 8) * 8;
    const T* src = x + row * p.x_row_stride + col;
    if (row < p.m && vec_x && col + 8 <= p.k) {
      st.x[i] = *reinterpret_cast<const uint4*>(src);
    } else {
      T e[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) e[c] = row < p.m && col + c < p.k ? src[c] : from_float<T>(0.0f);
      memcpy(&st.x[i], e, sizeof(e));
    }
  }
}

// Writes a stage to shared memory: x as loaded, the weight decoded and
// rounded once to T (as the dequantised weight); weight rows past n and
// columns past k (padding) are 0.
template <class T>
__device__ __forceinline__ void store_stage(const WeightOnlyParams& p, const WeightRow& wr, bool in_rows, int64_t k0,
                                            const GemmStage& st, T* sX, T* sW) {
#pragma unroll
  for (int i = 0; i < kXChunks; ++i) {
    const int u = threadIdx.x + kGemmThreads * i;
    *reinterpret_cast<uint4*>(sX + (u / 8) * kGemmLd + (u % 8) * 8) = st.x[i];
  }
  T* dst_row = sW + (threadIdx.x >> 1) * kGemmLd;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j == 1 && wr.four_bit) break;
    const int64_t q = tile_packet(wr, k0, j);
    for (int run = 0; run < wr.runs_per_packet(); ++run) {
      const int64_t c = wr.run_column(q, run);
      float w[kRun] = {};
      if (in_rows && c < p.k) wr.decode(st.w[j], q, run, w);
      T e[kRun];
#pragma unroll
      for (int i = 0; i < kRun; ++i) e[i] = from_float<T>(c + i < p.k ? w[i] : 0.0f);
      uint4 v[2];  // two 16-byte stores: a run starts a multiple of 32 bytes into a 16-byte aligned row
      memcpy(v, e, sizeof(v));
      uint4* dst = reinterpret_cast<uint4*>(dst_row + (c - k0));
      dst[0] = v[0];
      dst[1] = v[1];
    }
  }
}

// Grid (n tiles, m tiles, k splits); split z covers k steps
// [z * steps_per_split, (z + 1) * steps_per_split). With one split the block
// writes out (+ bias); otherwise its fp32 partial, workspace[z][m][n].
template <class T>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_kernel(const WeightOnlyParams p, bool vec_w, bool vec_x, int64_t steps_per_split, float* workspace) {
  using Mma = cuda::MmaType<T>;
  TK_DYNAMIC_SMEM(smem);
  T* sX = reinterpret_cast<T*>(smem);
  T* sW = sX + kGemmTile * kGemmLd;
  float* nf4_table = reinterpret_cast<float*>(smem + kGemmTileBytes);
  load_nf4_table(nf4_table);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kGemmTile, m0 = static_cast<int64_t>(blockIdx.y) * kGemmTile;
  const int64_t k_begin = blockIdx.z * steps_per_split * kGemmTile;
  const int64_t k_end = min(p.k, k_begin + steps_per_split * kGemmTile);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int64_t w_row = n0 + (threadIdx.x >> 1);
  const bool in_rows = w_row < p.n;
  const WeightRow wr(p, in_rows ? w_row : 0, vec_w, nf4_table);
  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

  GemmStage st;
  load_stage<T>(p, wr, in_rows, vec_x, m0, k_begin, st);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kGemmTile) {
    __syncthreads();  // the previous tiles are no longer read
    store_stage(p, wr, in_rows, k0, st, sX, sW);
    __syncthreads();
    if (k0 + kGemmTile < k_end) load_stage<T>(p, wr, in_rows, vec_x, m0, k0 + kGemmTile, st);  // in flight below
#pragma unroll
    for (int kk = 0; kk < kGemmTile / 16; ++kk) {
      uint32_t a[2][4];
      cuda::load_a(a[0], sX, kGemmLd, wm, kk * 16, lane);
      cuda::load_a(a[1], sX, kGemmLd, wm + 16, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t b[4];
        cuda::load_b_nk(b, sW, kGemmLd, wn + 16 * j, kk * 16, lane);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          Mma::mma(acc[i][2 * j], a[i], b[0], b[1]);
          Mma::mma(acc[i][2 * j + 1], a[i], b[2], b[3]);
        }
      }
    }
  }

  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  float* partial = workspace ? workspace + blockIdx.z * p.m * p.n : nullptr;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = m0 + wm + 16 * i + g + 8 * (e >> 1), col = n0 + wn + 8 * j + 2 * t + (e & 1);
        if (row >= p.m || col >= p.n) continue;
        if (partial)
          partial[row * p.n + col] = acc[i][j][e];
        else
          out[row * p.out_row_stride + col] = from_float<T>(acc[i][j][e] + (bias ? to_float(bias[col]) : 0.0f));
      }
}

}  // namespace

void weight_only_matmul_cuda(const WeightOnlyParams& p, CUstream_st* stream) {
  if (p.m > kMaxRows) throw std::invalid_argument("weight_only_matmul_cuda: at most 8 rows of x per call");
  if (p.k >= (int64_t{1} << 31)) throw std::invalid_argument("weight_only_matmul_cuda: in_features must be < 2^31");
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(p.n, kWarps)));
  const bool vec_weight = rows_aligned(p.qweight, p.qweight_row_stride);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec_x = rows_aligned(p.x, (p.m > 1 ? p.x_row_stride : 0) * static_cast<int64_t>(sizeof(T)));
    if (p.m <= 1)
      TK_KERNEL_LAUNCH(grid, 32 * kWarps, kNf4TableBytes, stream, gemv_kernel<T, 1>)(p, vec_weight, vec_x);
    else if (p.m <= 4)
      TK_KERNEL_LAUNCH(grid, 32 * kWarps, kNf4TableBytes, stream, gemv_kernel<T, 4>)(p, vec_weight, vec_x);
    else
      TK_KERNEL_LAUNCH(grid, 32 * kWarps, kNf4TableBytes, stream, gemv_kernel<T, kMaxRows>)(p, vec_weight, vec_x);
  });
  cuda::check_launch("weight_only_matmul");
}

int64_t weight_only_gemm_cuda_splits(const WeightOnlyParams& p) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // Enough blocks for about four per SM (each streams its weight packets),
  // but at least 4 k steps per split so partial sums stay a small overhead.
  const int64_t tiles = cuda::ceil_div(p.n, kGemmTile) * cuda::ceil_div(p.m, kGemmTile);
  const int64_t steps = cuda::ceil_div(p.k, kGemmTile);
  const int64_t want = cuda::ceil_div(4 * static_cast<int64_t>(std::max(sms, 1)), tiles);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, steps / 4, 65535}));
  return cuda::ceil_div(steps, cuda::ceil_div(steps, splits));  // no empty split
}

void weight_only_gemm_cuda(const WeightOnlyParams& p, int64_t splits, float* workspace, CUstream_st* stream) {
  if (p.dtype == DType::kFloat32) throw std::invalid_argument("weight_only_gemm_cuda: x must be bf16 or fp16");
  if (p.k >= (int64_t{1} << 31)) throw std::invalid_argument("weight_only_gemm_cuda: in_features must be < 2^31");
  if (splits < 1 || (splits > 1 && workspace == nullptr))
    throw std::invalid_argument("weight_only_gemm_cuda: splits > 1 need a workspace of splits x m x n floats");
  if (p.m <= 0) return;
  const int64_t steps = cuda::ceil_div(p.k, kGemmTile), per_split = cuda::ceil_div(steps, splits);
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(p.n, kGemmTile)),
                  static_cast<unsigned>(cuda::ceil_div(p.m, kGemmTile)),
                  static_cast<unsigned>(cuda::ceil_div(steps, per_split)));
  const bool vec_w = rows_aligned(p.qweight, p.qweight_row_stride);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      const bool vec_x = rows_aligned(p.x, p.x_row_stride * static_cast<int64_t>(sizeof(T)));
      float* ws = grid.z > 1 ? workspace : nullptr;
      TK_KERNEL_LAUNCH(grid, kGemmThreads, kGemmSmemBytes, stream, gemm_kernel<T>)(p, vec_w, vec_x, per_split, ws);
      cuda::check_launch("weight_only_gemm");
      if (ws != nullptr) quant_cuda::launch_split_sum<T>(p, static_cast<int>(grid.z), ws, stream);
    }
  });
}

void weight_only_dequantize_cuda(const WeightOnlyParams& p, void* dense, CUstream_st* stream) {
  if (p.k >= (int64_t{1} << 31)) throw std::invalid_argument("weight_only_dequantize_cuda: in_features must be < 2^31");
  const int64_t row_bytes = p.format == WeightFormat::kInt8 ? p.k : p.qweight_row_stride;
  const int64_t packets = (row_bytes + 15) / 16;
  const int blocks = static_cast<int>(std::min<int64_t>(4096, cuda::ceil_div(p.n * packets, 256)));
  const bool vec = rows_aligned(p.qweight, p.qweight_row_stride);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    TK_KERNEL_LAUNCH(blocks, 256, kNf4TableBytes, stream, dequantize_kernel<T>)(p, vec, static_cast<T*>(dense));
  });
  cuda::check_launch("weight_only_dequantize");
}

}  // namespace torchkiln
